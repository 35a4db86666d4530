"""hist-train end to end: real processes, real HDF5 files, the real CIFAR-10 sample."""

import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch

from helpers import BIN, TINY_RUN, check_recorded, horovodrun, kill_job, mpirun, rank_pids, run, spawn

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TINY = TINY_RUN


def rounds(path):
    with h5py.File(path, "r") as f:
        return {k: f["rounds"][k][:] for k in f["rounds"]}, {k: f["evals"][k][:] for k in f["evals"]}, dict(f.attrs)


def test_ist_on_real_cifar10_sample_learns(cifar_sample, tmp_path):
    out = tmp_path / "ist.h5"
    proc = horovodrun(
        2,
        BIN / "hist-train",
        "cifar10",
        "--data-dir",
        cifar_sample,
        "--arch",
        "preact_resnet34",
        "--width",
        "0.125",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--local-iters",
        "10",
        "--lr",
        "0.05",
        "--threads",
        "1",
        "--out",
        out,
        timeout=600,
    )
    last = proc.stdout.strip().splitlines()[-1]
    assert "final test accuracy" in proc.stdout and "figures    hist-report" in last
    r, e, attrs = rounds(out)
    loss = r["loss"].mean(axis=1)
    assert loss[-3:].mean() < loss[:3].mean() - 0.1
    assert e["test_accuracy"][-1] > 20.0  # chance is 10%
    assert attrs["status"] == "completed" and attrs["world_size"] == 2 and attrs["subnets"] == 2
    assert r["bytes_sent"].shape == (len(loss), 2) and (r["bytes_sent"] > 0).all()
    assert attrs["train_images"] == 4577 and attrs["test_images"] == 508
    mpi = json.loads(attrs["versions"])["mpi"]
    assert mpi.startswith("Open MPI") and "\x00" not in mpi  # the library's string ends in a NUL


def test_four_processes_two_subnetworks(tmp_path):
    """IST at 4 ranks in 2 subnetworks: gradients averaged within each subnetwork's process set.
    (local SGD and dp average over the whole world at 4 ranks as at 2, where every test of theirs
    runs; at 4 they once had a 4-rank run each here: what differs, their one subnetwork, is
    decided before any process starts and checked below in this process.)"""
    out = tmp_path / "ist.h5"
    mpirun(4, BIN / "hist-train", "synthetic", "--subnets", "2", "--epochs", "1", *TINY, "--out", out, timeout=600)
    check_recorded("ist-np4-s2", out)
    r, e, attrs = rounds(out)
    assert attrs["world_size"] == 4 and attrs["method"] == "ist" and attrs["subnets"] == 2
    assert r["round"].tolist() == list(range(len(r["round"]))) and len(e["test_accuracy"]) == 1
    assert (r["bytes_sent"].sum(axis=1) > 0).all()
    assert (r["sync_s"] > 0).all()  # two ranks per subnetwork share their gradients every step
    from hist.config import Config
    from hist.launch import check_options

    for method, subnets in (("ist", 2), ("local-sgd", 1), ("dp", 1)):
        cfg = Config(method=method, subnets=2, arch="preact_resnet34", device="cpu", out=str(out))
        assert check_options(cfg, world_size=4, local_rank=0).subnets == subnets, method


def test_single_process_and_determinism(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for out in (a, b):
        run([BIN / "hist-train", "synthetic", "--epochs", "1", *TINY, "--out", out])
    ra, ea, attrs = rounds(a)
    rb, eb, _ = rounds(b)
    assert attrs["method"] == "single" and attrs["world_size"] == 1
    check_recorded("single", a)
    assert np.array_equal(ra["loss"], rb["loss"]) and np.array_equal(ea["test_loss"], eb["test_loss"])


def final_model(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _spawn(args, out):
    return spawn(
        2,
        BIN / "hist-train",
        "synthetic",
        "--epochs",
        "6",
        *TINY,
        "--checkpoint-every",
        "2",
        "--out",
        out,
        *args,
        merge_output=True,
    )


def _wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, (
            proc.stdout.read() if proc.poll() is not None else "timeout"
        )
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The run each way of cutting it short must resume to (made once for both)."""
    ref = tmp_path_factory.mktemp("uninterrupted") / "ref.h5"
    mpirun(2, BIN / "hist-train", "synthetic", "--epochs", "6", *TINY, "--checkpoint-every", "2", "--out", ref)
    check_recorded("ist-np2", ref)
    return ref


@pytest.mark.parametrize("how", ["sigkill", "sigusr1", "after-rounds"])
def test_killed_run_resumes_to_the_uninterrupted_model(tmp_path, how, uninterrupted_run):
    """Also 2-process IST's determinism: each cut run starts afresh in processes of its own, and
    its rounds before the cut must equal the reference's to the bit, as the resumed ones must."""
    ref = uninterrupted_run
    out = tmp_path / "cut.h5"
    if how == "after-rounds":  # the run stops itself (tools/gpu-check.sh: no signal racing its pace)
        proc = _spawn(["--stop-after-rounds", "3"], out)
        assert proc.wait(240) == 3 and "resume with --resume" in proc.stdout.read()
        assert rounds(out)[0]["round"].tolist() == [0, 1, 2]
        assert torch.load(out.with_suffix(".ckpt.pt"), weights_only=False)["round"] == 3
    else:
        proc = _spawn(["--stop-signal", "USR1"] if how == "sigusr1" else [], out)  # USR2 is the default
        _wait_for(out.with_suffix(".ckpt.pt"), proc)
    if how == "sigkill":
        kill_job(proc, out)
    elif how == "sigusr1":  # Slurm's warning before the time limit
        # srun --signal delivers it to the ranks; one is enough, the ranks agree at each round end
        os.kill(rank_pids(out)[0], signal.SIGUSR1)
        assert proc.wait(120) == 3  # checkpoint at the round end, then exit 3
        assert "resume with --resume" in proc.stdout.read()
    r, _, _ = rounds(out)  # the killed run's file stays readable
    ref_rounds = rounds(ref)[0]["round"]
    assert len(r["round"]) < len(ref_rounds)
    mpirun(
        2, BIN / "hist-train", "synthetic", "--epochs", "6", *TINY, "--checkpoint-every", "2", "--out", out, "--resume"
    )
    r, e, attrs = rounds(out)
    assert r["round"].tolist() == ref_rounds.tolist()  # none missing, none repeated
    assert attrs["status"] == "completed"
    a, b = final_model(ref.with_suffix(".ckpt.pt")), final_model(out.with_suffix(".ckpt.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("num_batches_tracked"))
    assert np.array_equal(rounds(ref)[0]["loss"], r["loss"])


# Every option of the accuracy work at once: state that must survive a kill exactly.
ACCURACY_OPTIONS = [
    "--optimizer-state",
    "average",
    "--outer-lr",
    "0.7",
    "--outer-momentum",
    "0.9",
    "--warmup-local-sgd-epochs",
    "1",
    "--lr-scaling",
    "linear",
    "--warmup-epochs",
    "1",
]


def cut_and_resume(tmp_path, *args):
    """`hist-train ARGS` on 2 ranks uninterrupted, and again SIGKILLed after its first
    checkpoint and resumed: (reference timing file, resumed one, their final checkpoints)."""
    ref, out = tmp_path / "ref.h5", tmp_path / "cut.h5"
    mpirun(2, BIN / "hist-train", *args, "--out", ref)
    proc = spawn(2, BIN / "hist-train", *args, "--out", out, merge_output=True)
    _wait_for(out.with_suffix(".ckpt.pt"), proc)
    kill_job(proc, out)
    assert len(rounds(out)[0]["round"]) < len(rounds(ref)[0]["round"])  # it was cut short
    mpirun(2, BIN / "hist-train", *args, "--out", out, "--resume")
    load = lambda p: torch.load(p.with_suffix(".ckpt.pt"), map_location="cpu", weights_only=True)
    return ref, out, load(ref), load(out)


def same_model(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("method", ["ist", "local-sgd"])
def test_resume_is_exact_with_momentum_outer_step_and_warmups(tmp_path, method):
    common = ["--epochs", "6", *TINY, "--checkpoint-every", "2", "--method", method, *ACCURACY_OPTIONS]
    common += ["--noise-every", "3"]  # gradient-noise probes: their rows cut back on resume, then exact
    ref, out, a, b = cut_and_resume(tmp_path, "synthetic", *common)
    check_recorded(f"{method}-warmups-outer-noise", ref)
    assert same_model(a["model"], b["model"])
    noise = [h5py.File(p, "r")["noise"] for p in (ref, out)]
    assert len(noise[0]["round"]) == 4 and all(np.array_equal(noise[0][k], noise[1][k]) for k in noise[0])
    assert a["optimizer"] is not None  # momentum is aggregated, so it is global state and saved
    moms = [
        (x["momentum_buffer"], y["momentum_buffer"])
        for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
    ]
    assert moms and all(torch.equal(x, y) for x, y in moms)
    assert all(
        torch.equal(x, y) for x, y in zip(a["hist"]["method"]["outer_momentum"], b["hist"]["method"]["outer_momentum"])
    )
    assert np.array_equal(rounds(ref)[0]["loss"], rounds(out)[0]["loss"])


def test_local_sgd_warmup_rounds_train_and_send_the_full_model(tmp_path):
    out = tmp_path / "w.h5"
    mpirun(2, BIN / "hist-train", "synthetic", "--epochs", "4", *TINY, "--warmup-local-sgd-epochs", "2", "--out", out)
    r, _, attrs = rounds(out)
    sent = r["bytes_sent"].sum(axis=1)
    # 8 steps an epoch, rounds of 4: four rounds of local SGD (the whole model averaged), then
    # IST (shared parameters and the blocks the next plan needs); the last round syncs everything
    assert len(sent) == 8 and len(set(sent[:4])) == 1 and max(sent[4:7]) < sent[0]


def test_a_dying_rank_ends_the_job_in_time(tmp_path):
    out = tmp_path / "die.h5"
    proc = _spawn(["--epochs", "50"], out)
    _wait_for(out, proc)
    time.sleep(2)
    os.kill(rank_pids(out)[-1], signal.SIGKILL)
    start = time.time()
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job hung after one rank died")
    output = proc.stdout.read()
    assert code != 0 and time.time() - start < 60
    assert "rank" in output and "node" in output  # mpirun names the rank and host that died


@pytest.mark.parametrize("method", ["ist", "dp"])
def test_bf16_channels_last_trains_with_the_same_bytes(tmp_path, method, finished_run):
    args = ["synthetic", "--epochs", "3", *TINY, "--method", method]
    runs = {"fp32": rounds(finished_run(*args))}  # the plain run test_noise compares its probes with
    out = tmp_path / "bf16.h5"
    mpirun(2, BIN / "hist-train", *args, "--precision", "bf16", "--channels-last", "--out", out)
    runs["bf16"] = rounds(out)
    check_recorded(f"{method}-np2-3-epochs", finished_run(*args))
    check_recorded(f"{method}-bf16", out)
    r, e, attrs = runs["bf16"]
    assert r["loss"][-3:].mean() < r["loss"][:3].mean()  # it learns
    assert json.loads(attrs["config"])["precision"] == "bf16" and attrs["block_transport"] == "host"
    # the same tensors cross the wire in every round: precision and layout change no byte
    assert np.array_equal(r["bytes_sent"], runs["fp32"][0]["bytes_sent"])
    assert np.array_equal(r["bytes_received"], runs["fp32"][0]["bytes_received"])
    assert not np.array_equal(r["loss"], runs["fp32"][0]["loss"])  # and bf16 really ran


def test_resume_is_exact_with_fp16_and_its_loss_scale(tmp_path):
    # fp16 is slow on some CPUs (10 to 75 images/s a rank): 128 images, 5 one-round epochs cut
    # after the checkpoint at the second, one evaluation at the end. Three rounds after that
    # checkpoint: with one, a loaded machine let the run end before the SIGKILL landed.
    small = ["--synthetic-size", "128", "--batch-size", "16", "--eval-every-epochs", "5"]
    fp16 = ["--precision", "fp16", "--channels-last", "--subnets", "2", *small]
    ref, out, a, b = cut_and_resume(tmp_path, "synthetic", "--epochs", "5", *TINY, "--checkpoint-every", "2", *fp16)
    check_recorded("ist-fp16", ref)
    assert len(a["hist"]["scaler"]) == 2  # one gradient scaler per rank: the subnetworks skip apart
    assert a["hist"]["scaler"] == b["hist"]["scaler"]
    assert same_model(a["model"], b["model"])
    assert np.array_equal(rounds(ref)[0]["loss"], rounds(out)[0]["loss"])
