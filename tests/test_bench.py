"""A smoke run of the benchmark (tiny sizes; the figures themselves are in the README)."""

import json

import pytest

from hist.analysis.bench import _env, _train, bytes_per_round
from hist.models import build_model, conv_flops

from helpers import BIN, TINY_RUN, run


@pytest.mark.multiprocess
@pytest.mark.slow
def test_bench_quick_prints_every_figure(cifar_sample):
    proc = run(
        [
            BIN / "hist-bench",
            "--quick",
            "--json",
            "--width",
            "0.0625",
            "--batch-size",
            "16",
            "--data-dir",
            cifar_sample,
        ],
        timeout=900,
    )
    r = json.loads(proc.stdout)
    assert set(r["subnet_step_ratio"]) == {"2", "4", "8"}
    assert all(0 < v < 1.5 for v in r["subnet_step_ratio"].values())
    assert set(r["speedup_np2"]) == {"ist", "local-sgd", "dp"} and all(v > 0 for v in r["speedup_np2"].values())
    assert 0 <= r["sync_share"] < 1 and r["pipeline_ratio"] > 0
    assert set(r["accuracy"]) == {"dataset", "single", "ist_s2", "ist_s4"} and r["accuracy"]["dataset"] == "cifar10"
    assert r["machine"]["cores"] >= 1 and "torch" in r["machine"] and r["machine"]["cpu_capability"]
    measured = {(row["precision"], row["channels_last"]): row for row in r["precision_layout"] if "skipped" not in row}
    skipped = {row["precision"]: row["skipped"] for row in r["precision_layout"] if "skipped" in row}
    # a precision is measured where the device has a fast path for it: fp16 never on a CPU
    assert skipped["fp16"] == "no fp16 fast path on a CPU"
    assert set(measured) | {(p, cl) for p in skipped for cl in (False, True)} == {
        (p, cl) for p in ("fp32", "bf16", "fp16") for cl in (False, True)
    }
    assert all(row["full_images_per_s"] > 0 and row["s8_images_per_s"] > 0 for row in measured.values())
    assert set(r["overlap"]["sync_s_per_round"]) == {"overlap", "no-overlap"}
    assert all(v > 0 for v in r["overlap"]["sync_s_per_round"].values())
    # hist's step against a bare PyTorch step of the same subnetwork, alone and inside IST at 2 ranks
    b = r["bare_step_ratio"]
    assert set(b["np1"]) == set(b["ist_np2"]) == {"0.0625"}
    assert all(0.5 < v < 2 for v in [*b["np1"].values(), *b["ist_np2"].values()])
    assert all(t["hist_step_s"] > 0 and t["bare_step_s"] > 0 for t in b["step_s"].values())
    phases = {"bare_step", "subnet_step_ratio", "precision_layout", "pipeline", "end_to_end", "overlap", "accuracy"}
    assert set(r["phase_s"]) == phases and all(v > 0 for v in r["phase_s"].values())
    assert sum(r["phase_s"].values()) <= r["bench_s"]


def test_byte_counts_follow_the_models_sizes():
    b = bytes_per_round(rounds=3)
    model = build_model("preact_resnet101", 100)
    full = sum(p.numel() for p in model.parameters()) * 4
    assert b["local-sgd-restart"]["2"] == pytest.approx(2 * full)  # 2 ranks x 2(k-1)/k x M
    assert b["local-sgd"]["2"] == pytest.approx(4 * full)  # with the momentum buffers
    assert b["dp"]["8"] == pytest.approx(50 * 14 * full)
    # IST sends the shared part by allreduce and a block only to its next trainer
    assert b["ist"]["8"] < 0.5 * b["local-sgd"]["8"] and b["ist"]["8"] == pytest.approx(2 * b["ist-restart"]["8"])
    assert b["ist"]["2"] < b["ist"]["4"] < b["ist"]["8"]


def test_flops_of_subnetworks_shrink_with_depth():
    model = build_model("preact_resnet101", 10, 0.25)
    full = conv_flops(model, range(22))
    assert conv_flops(model, range(11)) < full and conv_flops(model, []) < conv_flops(model, range(11))


def test_a_run_two_phases_need_is_trained_once(tmp_path):
    """The bench keys each real hist-train run by its options and ranks: the second ask reads
    the first run's file (the quick bench's IST epoch serves its overlap measurement too)."""
    args = ["synthetic", "--epochs", "0.5", *[str(a) for a in TINY_RUN]]
    first = _train(args, 1, tmp_path, _env())
    (path,) = tmp_path.glob("run-np1-*.h5")
    stamp = path.stat().st_mtime_ns
    again = _train(args, 1, tmp_path, _env())
    assert path.stat().st_mtime_ns == stamp and list(tmp_path.glob("*.h5")) == [path]
    assert (again.rounds["loss"] == first.rounds["loss"]).all()
    _train([*args, "--seed", "1"], 1, tmp_path, _env())  # other options: a run of its own
    assert len(list(tmp_path.glob("run-np1-*.h5"))) == 2


@pytest.mark.multiprocess
def test_the_engines_bench_runs_each_method_under_both_launchers():
    """`hist-bench engines` trains under horovodrun and under torchrun (real runs, tiny) and
    reports both engines' figures and their ratio."""
    proc = run(
        [BIN / "hist-bench", "engines", "--methods", "ist", "--repeats", "1", "--synthetic-size", "128",
         "--batch-size", "16", "--local-iters", "2", "--json"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)["ist"]
    for engine in ("horovod", "torch"):
        assert r["seconds_per_epoch"][engine] > 0 and r["sync_s_per_round"][engine] > 0
    assert r["seconds_per_epoch_torch_over_horovod"] == pytest.approx(
        r["seconds_per_epoch"]["torch"] / r["seconds_per_epoch"]["horovod"]
    )


def test_the_engines_bench_refuses_an_unknown_method_in_one_line():
    from click.testing import CliRunner

    from hist.cli import bench

    result = CliRunner().invoke(bench, ["engines", "--methods", "ist,fedavg"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "hist-bench: error: --methods 'ist,fedavg': give some of ist, local-sgd, dp, comma-separated"
    ]
