"""Hostile files, numerical blow-ups, full disks and clashing jobs: one line, nothing lost."""

import os
import pickle
import random
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch

from helpers import BIN, TINY_MODEL, hist_train, mpirun, one_line_error, options, rank_pids, run, spawn

TINY = [*TINY_MODEL, *options(batch_size=16, synthetic_size=256, threads=1, local_iters=4, bn_batches=2)]


class CreatesFile:
    """Unpickling this runs `touch <path>`: what a crafted file would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def one_line(proc, prog, *needles, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [l for l in proc.stderr.splitlines() if f"{prog}: error" in l]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- files that would run code


def test_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path, cifar_sample):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_sample / "cifar-10-batches-py", folder)
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": CreatesFile(marker), b"labels": [1]}))
    # in this process, through the real command (test_cli_errors.py: why): a file read here would run here
    line = one_line_error(hist_train("cifar10", "--data-dir", tmp_path, "--out", tmp_path / "x.h5"), "data_batch_3")
    assert "posix.system" in line and "not an official CIFAR file" in line
    assert not marker.exists()


def test_the_real_cifar_files_still_load(cifar_sample):
    from hist.data import read_cifar10

    split = read_cifar10(cifar_sample / "cifar-10-batches-py", train=False)
    assert split.images.shape == (508, 3, 32, 32) and split.images.dtype == np.uint8


def _resume(tmp_path, checkpoint):
    return run(
        [
            BIN / "hist-train",
            "synthetic",
            *TINY,
            "--epochs",
            "0.5",
            "--out",
            tmp_path / "x.h5",
            "--checkpoint",
            checkpoint,
            "--resume",
        ],
        check=False,
        timeout=180,
    )


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """A real `--resume` process: the checkpoint is read after the ranks connect, and its error
    is said once by rank 0 (a CollectiveError), across the real process boundary."""
    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.ckpt.pt"
    torch.save({"model": CreatesFile(marker), "round": 1, "wall_s": 0.0, "identity": {}}, ckpt)
    line = one_line(_resume(tmp_path, ckpt), "hist-train", str(ckpt), "not written by hist-train")
    assert not marker.exists(), line


@pytest.mark.parametrize("kind", ["foreign", "truncated", "not-a-checkpoint", "older"])
def test_foreign_or_damaged_checkpoint_gives_one_line(tmp_path, kind):
    """The resume decision in this process (a whole --resume process per kind decides nothing
    more; the crafted checkpoint above keeps the real one): one line, raised on every rank alike."""
    from hist.config import Config
    from hist.errors import CollectiveError
    from hist.launch import Checked, load_resume_state

    ckpt = tmp_path / "c.ckpt.pt"
    if kind == "foreign":  # a valid torch file of someone else's
        torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 4}, ckpt)
        needle = "not a hist-train checkpoint"
    elif kind == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}, "round": 1, "wall_s": 0.0, "identity": {}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:700])
        needle = "damaged or truncated"
    elif kind == "older":  # hist-train's before its loop ran on hist.IST's session
        torch.save({"model": {"w": torch.zeros(3)}, "round": 1, "wall_s": 0.0, "identity": {}, "method": {}}, ckpt)
        needle = "older than its rebuild on hist.IST's session"
    else:
        ckpt.write_text("hello")
        needle = "damaged or truncated"
    checked = Checked(1, tmp_path / "x.h5", ckpt, torch.device("cpu"), "local")
    with pytest.raises(CollectiveError) as e:
        load_resume_state(Config(resume=True), checked, {})
    assert str(ckpt) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- numerical blow-up


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_diverging_run_stops_on_every_rank_and_keeps_the_good_rounds(tmp_path):
    out = tmp_path / "d.h5"
    ckpt = out.with_suffix(".ckpt.pt")
    args = ["synthetic", *TINY, "--checkpoint-every", "1", "--out", out]
    mpirun(2, BIN / "hist-train", *args, "--epochs", "1", timeout=240)  # sane: a good checkpoint
    good = torch.load(ckpt, map_location="cpu", weights_only=True)
    start = time.time()
    # continued with an absurd learning rate, as a user trying a bigger one would
    proc = mpirun(2, BIN / "hist-train", *args, "--epochs", "3", "--lr", "1e12", "--resume", check=False, timeout=240)
    assert time.time() - start < 200  # no rank waited for another
    line = one_line(proc, "hist-train", "diverged", "round", "rank", "--lr")
    with h5py.File(out) as f:
        assert f.attrs["status"] == "diverged"
        assert np.isfinite(f["rounds/loss"][:]).all()  # only the good rounds were kept
        kept = len(f["rounds/round"])
    assert kept == good["round"] and f"in round {kept + 1} " in line
    after = torch.load(ckpt, map_location="cpu", weights_only=True)  # the last good one, unchanged
    assert after["round"] == good["round"]
    assert all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])


# ---------------------------------------------------------------- full and failing disks


def _small_fs(tmp_path, size="3m"):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({proc.stderr.strip()})")
    return mnt


def _spawn(args):
    return spawn(2, BIN / "hist-train", *args)


def _remount_read_only(mnt, within=60.0):
    """Remount as an administrator would: the kernel refuses ("mount point is busy") while a rank
    has a file open for writing there, so try again between the run's writes."""
    deadline = time.time() + within
    while True:
        proc = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        if time.time() > deadline:
            pytest.fail(f"could not remount {mnt} read-only within {within:.0f} s: {proc.stderr.strip()}")
        time.sleep(0.05)


@pytest.mark.parametrize("fault", ["disk-full", "read-only"])
@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_failing_disk_ends_the_job_with_one_line_and_keeps_the_checkpoint(tmp_path, fault):
    mnt = _small_fs(tmp_path)
    try:
        out, ckpt = mnt / "run.h5", mnt / "run.ckpt.pt"
        proc = _spawn(["synthetic", *TINY, "--epochs", "40", "--checkpoint-every", "1", "--out", out])
        deadline = time.time() + 240
        while not ckpt.exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        if fault == "disk-full":
            with open(mnt / "filler", "wb") as f:  # takes every free byte, as another job would
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                        f.flush()
                except OSError:
                    pass
        else:
            _remount_read_only(mnt)
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("a rank waited forever after the disk failed")
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        cause = "no space left on device" if fault == "disk-full" else "read-only file system"
        line = one_line(result, "hist-train", str(mnt), cause)
        assert str(out) in line or str(ckpt) in line
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # the previous one, whole
        assert state["round"] >= 1
        assert not [p.name for p in mnt.iterdir() if ".tmp" in p.name]
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# ---------------------------------------------------------------- clashing jobs


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_second_run_on_the_same_output_refuses_to_start(tmp_path):
    out = tmp_path / "shared.h5"
    # far longer than the test: the first run holds the file until this test stops it, so a
    # loaded machine cannot let it finish before the second starts
    first = _spawn(["synthetic", *TINY, "--epochs", "5000", "--checkpoint-every", "2", "--out", out])
    try:
        deadline = time.time() + 240
        while not out.exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        with h5py.File(out) as f:
            rounds_before = len(f["rounds/round"])
        second = run([BIN / "hist-train", "synthetic", *TINY, "--out", out], check=False, timeout=120)
        line = one_line(second, "hist-train", str(out), "in use by another run", "--out")
        assert "pid" in line
        assert first.poll() is None  # the second changed nothing of the first
        os.kill(rank_pids(out)[0], signal.SIGUSR2)  # the clean stop: checkpoint at a round end, exit 3
        stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 3, stderr[-2000:]
        with h5py.File(out) as f:  # the first run's file is whole: every round once
            assert f.attrs["status"] == "interrupted"
            assert f["rounds/round"][:].tolist() == list(range(len(f["rounds/round"])))
            assert len(f["rounds/round"]) >= rounds_before
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)


def test_a_file_system_without_locks_warns_and_takes_the_output(tmp_path, monkeypatch):
    """Lustre mounted `noflock` answers flock with ENOSYS; this machine has no such mount, so
    flock is replaced here (the only mock in this file), and only for that errno's path."""
    import errno

    from hist.io import runlock

    def no_locks(f, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"has no file locks \(Function not implemented\): nothing stops"):
        lock = runlock.RunLock([tmp_path / "a.h5"])
    lock.release()
    assert not runlock.held_by_a_run(tmp_path / "a.h5")

    def denied(f, op):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(runlock.fcntl, "flock", denied)
    with pytest.raises(PermissionError):  # any other failure still stops the run
        runlock.RunLock([tmp_path / "b.h5"])
    monkeypatch.undo()  # the real flock again: a held lock is seen
    lock = runlock.RunLock([tmp_path / "c.h5"])
    assert runlock.held_by_a_run(tmp_path / "c.h5")
    lock.release()
    assert not runlock.held_by_a_run(tmp_path / "c.h5")


def test_a_failed_read_is_tried_again_only_while_a_run_holds_the_file(tmp_path):
    """A read that meets the live writer's append fails; while the run's lock is held it is tried
    again, for as long as a writer descheduled mid-append on a loaded node may take (here the file
    becomes whole 3 s later, past what 20 tries 0.1 s apart waited, which once failed in CI), and
    without the lock it fails at once."""
    import threading

    from hist.errors import HistError
    from hist.io.runlock import RunLock
    from hist.io.timings import read_run

    from test_report import write_run

    good = write_run(tmp_path / "good.h5", "single", 1, 4.0).read_bytes()
    path = tmp_path / "live.h5"
    path.write_bytes(good[:1000])  # as a reader may see it mid-append
    start = time.time()
    with pytest.raises(HistError):
        read_run(path)
    assert time.time() - start < 1.0  # no run holds it: damaged, said at once
    lock = RunLock([path])
    try:
        threading.Timer(3.0, path.write_bytes, [good]).start()
        assert len(read_run(path).rounds["round"]) == 4
    finally:
        lock.release()


def test_a_read_that_fails_as_the_run_lets_go_is_tried_once_more(tmp_path):
    """The read meets the run's last append; by the time it asks, the run has let go of the file
    (whole now): one more read, not an error. (CI met this at the end of test_watching's run.)"""
    from hist.errors import HistError
    from hist.io.timings import isolated

    marker, path = tmp_path / "read-once", tmp_path / "live.h5"
    path.write_bytes(b"")

    def meets_the_last_append(p):  # runs in the forked reader: the first read fails
        if not marker.exists():
            marker.touch()
            raise HistError(f"{p} is damaged (addr overflow)")
        return "whole"

    assert isolated(meets_the_last_append, path) == "whole"


# ---------------------------------------------------------------- damaged timing files


def _damage(src, dst, rng):
    blob = bytearray(src.read_bytes())
    how = rng.choice(["truncate", "flip", "half", "zero-block", "drop-dataset"])
    if how == "truncate":
        blob = blob[: rng.randrange(len(blob))]
    elif how == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(blob))
            blob[i] ^= 1 << rng.randrange(8)
    elif how == "half":
        blob = blob[: len(blob) // 2] + bytes(len(blob) - len(blob) // 2)
    elif how == "zero-block":
        i = rng.randrange(len(blob))
        blob[i : i + 512] = bytes(len(blob[i : i + 512]))
    dst.write_bytes(bytes(blob))
    if how == "drop-dataset":
        with h5py.File(dst, "a") as f:
            del f[rng.choice(["rounds/loss", "rounds/wall_s", "evals/test_accuracy", "rounds/bytes_sent"])]
    return how


@pytest.mark.slow
def test_report_fuzz_damaged_files_give_one_line_each(tmp_path):
    from test_report import write_run

    good = write_run(tmp_path / "good.h5", "single", 1, 4.0)
    bad_dir = tmp_path / "damaged"
    bad_dir.mkdir()
    rng = random.Random(1234)
    for i in range(200):
        _damage(good, bad_dir / f"copy{i:03d}.h5", rng)
    shutil.copy(good, bad_dir / "zz-good.h5")
    start = time.time()
    proc = subprocess.run([BIN / "hist-report", bad_dir, "--no-figures"], capture_output=True, text=True, timeout=300)
    assert time.time() - start < 240
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert all(l.startswith("hist-report: skipped: ") for l in lines), lines[:5]
    named = {l.split("skipped: ", 1)[1].split(" ")[0] for l in lines}
    assert len(named) == len(lines)  # one line per bad file
    assert len(lines) >= 100  # most of the 200 copies are damaged beyond reading
    assert "single" in proc.stdout  # the good file still made the table


def test_report_with_only_damaged_files_fails_with_one_line(tmp_path):
    """In this process through the real command (the fuzz above keeps a real hist-report process)."""
    from test_report import hist_report, write_run

    good = write_run(tmp_path / "good.h5", "single", 1, 4.0)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(good.read_bytes()[:1000])
    good.unlink()
    proc = hist_report(bad, "--no-figures")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert any("hist-report: error" in l for l in proc.stderr.splitlines())
