"""The gradient noise scale (McCandlish et al. 2018, Appendix A): the estimator on gradients of
known noise, and real probes in real runs that leave the training exactly as it was."""

import h5py
import numpy as np
import pytest
from test_rounds import TINY
from test_train import rounds

from hist.analysis.noise import probe_estimates, processes_that_pay, step_speedup

from helpers import BIN, mpirun


def test_estimator_recovers_the_gradient_and_the_noise_of_known_per_example_gradients():
    """Per-example gradients G + noise (covariance sigma^2 I in d dimensions): B_noise = d sigma^2 / |G|^2."""
    rng = np.random.default_rng(0)
    d, sigma, b, ranks, probes = 200, 3.0, 16, 4, 400
    true = rng.normal(size=d)
    g2, trace = true @ true, d * sigma**2
    rows = {k: [] for k in ("round", "epoch", "small_batch", "big_batch", "small_sq", "big_sq")}
    for i in range(probes):
        halves = true + sigma * rng.normal(size=(2 * ranks, b, d)).mean(axis=1)  # 2N half-batch gradients
        for k, v in zip(
            rows, (i, i / probes, b, 2 * ranks * b, np.mean((halves**2).sum(1)), (halves.mean(0) ** 2).sum())
        ):
            rows[k].append(v)
    noise = {k: np.asarray(v) for k, v in rows.items()}
    est_g2, est_trace = probe_estimates(noise)
    assert est_g2.mean() == pytest.approx(g2, rel=0.05) and est_trace.mean() == pytest.approx(trace, rel=0.05)
    assert est_trace.mean() / est_g2.mean() == pytest.approx(trace / g2, rel=0.08)


def test_process_counts_that_pay_stop_at_the_critical_batch():
    assert processes_that_pay(1000.0, 128) == 4  # 4 x 128 = 512 <= 1000 < 1024
    assert processes_that_pay(1024.0, 128) == 8
    assert processes_that_pay(100.0, 128) == 1
    speedup = step_speedup(1024.0, 128, [1, 8, 16, 1e9])
    assert (
        speedup[0] == 1
        and speedup[1] == pytest.approx(4.5)
        and speedup[2] == pytest.approx(6)
        and speedup[3] == pytest.approx(9)
    )


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("method", ["dp", "ist"])
def test_probes_measure_on_every_rank_and_change_nothing_of_the_training(tmp_path, method, finished_run):
    """dp (Horovod's hooks must not fire on a probe) and IST (a probe round syncs the whole model):
    the run with probes trains exactly like the one without (the plain run is shared with
    test_train's bf16 test); hist-report states and draws B_simple."""
    plain_args = ["synthetic", "--epochs", "3", *TINY, "--method", method]
    args = [BIN / "hist-train", *plain_args]
    mpirun(2, *args, "--noise-every", "2", "--out", tmp_path / "probed.h5")
    probed, plain = rounds(tmp_path / "probed.h5"), rounds(finished_run(*plain_args))
    assert np.array_equal(probed[0]["loss"], plain[0]["loss"]) and np.array_equal(
        probed[1]["test_accuracy"], plain[1]["test_accuracy"]
    )
    with h5py.File(tmp_path / "probed.h5", "r") as f:
        noise = {k: f["noise"][k][:] for k in f["noise"]}
    assert len(noise["round"]) == len(probed[0]["round"]) // 2 and (noise["round"] % 2 == 1).all()
    assert (noise["small_batch"] == 16).all() and (noise["big_batch"] == 64).all()  # batch 32: halves of 16, 4 of them
    assert (noise["small_sq"] > noise["big_sq"]).all() and (noise["big_sq"] > 0).all()  # averaging cuts the noise
    from test_report import hist_report  # in this process: the command's own code, no process start

    report = hist_report(tmp_path / "probed.h5", "-o", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    report = report.stdout
    assert "gradient noise scale, probed.h5: B_simple" in report and "data parallelism pays up to" in report
    assert (tmp_path / "report" / "noise_scale.png").stat().st_size > 0
    if method == "ist":  # the evaluation switches, on the finished run's model (--resume evaluates it again)
        final = probed[1]["test_loss"][-1]
        for switch in (["--test-scale", "none"], ["--eval-bn", "batch"]):
            again = mpirun(2, *args, "--out", tmp_path / "probed.h5", "--resume", *switch).stdout
            loss = again.split("final test accuracy")[1].split("test loss")[1].split()[0]
            assert loss != f"{final:.4f}", switch  # the evaluation is deterministic: only the switch can move it
