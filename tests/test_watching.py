"""Watching a run: progress lines (or a bar on a terminal) between evaluations, TensorBoard
scalars read back with TensorBoard's own reader against the HDF5 file, the end-of-run block."""

import os
import pty
import re
import subprocess
import time

import h5py
import numpy as np
import pytest

from helpers import BIN, ROOT, TINY_MODEL, mpi_env, mpirun, options, run

pytestmark = [pytest.mark.slow]

# ~40 rounds of 2 steps with one evaluation at the end: several seconds of rounds
TINY = [*TINY_MODEL, *options(batch_size=16, threads=1, synthetic_size=1280, local_iters=2, bn_batches=1)]
PROGRESS = re.compile(
    r"^epoch [\d.]+/[\d.]+ round (\d+)/(\d+) train loss [\d.]+ lr [\d.e-]+ \| \d+ images/s "
    r"\(data \d+% compute \d+% sync \d+%\) \| elapsed \S+ ETA \S+$"
)


def test_log_every_0_and_no_tensorboard_print_and_import_nothing_extra(tmp_path):
    code = (
        "import sys; from hist.config import Config; from hist.launch import run_training\n"
        f"run_training(Config(dataset='synthetic', arch='preact_resnet34', width=0.0625, epochs=0.25, "
        f"batch_size=16, synthetic_size=512, local_iters=2, bn_batches=1, threads=1, log_every=0, out={str(tmp_path / 'q.h5')!r}))\n"
        "print('imported:', sorted(m for m in sys.modules if m.split('.')[0] == 'tensorboard' "
        "or m.startswith('torch.utils.tensorboard')))"
    )
    proc = run([BIN / "python", "-c", code])
    assert proc.stdout.strip().splitlines()[-1] == "imported: []"  # (tqdm: torch itself imports it)
    assert not any(PROGRESS.match(line) for line in proc.stdout.splitlines())


def test_a_terminal_gets_one_updating_bar_instead_of_lines(tmp_path):
    parent, child = pty.openpty()
    cmd = [BIN / "hist-train", "synthetic", *TINY, "--epochs", "0.5", "--log-every", "0.5", "--out", tmp_path / "t.h5"]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=child, stderr=child, env=mpi_env(), cwd=ROOT)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(parent, 65536)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(300)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    assert re.search(r"\r *\d+% \|#* *\| round \d+/\d+ epoch", text), text  # the bar, redrawn in place
    assert not any(PROGRESS.match(line.strip()) for line in text.splitlines())
    assert "final test accuracy" in text


@pytest.mark.multiprocess
def test_tensorboard_scalars_match_the_timing_file_rounds(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, logdir = tmp_path / "tb.h5", tmp_path / "tb"
    args = [BIN / "hist-train", "synthetic", *TINY, "--epochs", "0.5", "--eval-every", "10", "--tensorboard", logdir]
    proc = mpirun(2, *args, "--out", out)
    assert "% |" not in proc.stdout + proc.stderr  # mpirun's pseudo-terminal is a log, not a terminal: no bar
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "test/top1", "test/top5", "time/images_per_s", "time/sync_s"):
        assert tag in tags, (tag, tags)
    assert {"comm/bytes_per_round", "ist/blocks_subnet0", "ist/blocks_subnet1"} <= tags
    scalar = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]
    with h5py.File(out) as f:
        r, e = f["rounds"], f["evals"]
        assert [s for s, _ in scalar("train/loss")] == r["round"][:].tolist()
        assert np.allclose([v for _, v in scalar("train/loss")], r["loss"][:].mean(axis=1), rtol=1e-5)
        assert np.allclose([v for _, v in scalar("train/lr")], r["lr"][:], rtol=1e-5)
        assert np.allclose([v for _, v in scalar("comm/bytes_per_round")], r["bytes_sent"][:].sum(axis=1))
        assert [s for s, _ in scalar("test/top1")] == e["round"][:].tolist()
        assert np.allclose([v for _, v in scalar("test/top1")], e["test_accuracy"][:], rtol=1e-5)
    blocks = np.array([v for _, v in scalar("ist/blocks_subnet0")]) + [v for _, v in scalar("ist/blocks_subnet1")]
    assert set(blocks.tolist()) == {5.0}  # ResNet-34's 5 partitioned blocks, split between 2 subnetworks
    assert any(t.startswith("options") for t in events.Tags()["tensors"])  # every option, once, as text


def test_under_a_launcher_the_log_gets_lines_not_a_bar():
    from hist.world import under_launcher

    # mpirun gives every rank a pseudo-terminal even when the job's log is a file
    assert under_launcher({"OMPI_COMM_WORLD_SIZE": "2"}) and under_launcher({"SLURM_PROCID": "0"})
    assert not under_launcher({"HOME": "/root"})


def test_each_line_reaches_the_stream_in_one_write_so_mpirun_tags_it_whole():
    from hist.engine.progress import Progress

    class Writes:
        def __init__(self):
            self.calls = []

        def write(self, text):
            self.calls.append(text)

        def flush(self):
            pass

    stream = Writes()
    progress = Progress(every_s=1e-9, n_rounds=2, total_epochs=1, stream=stream)
    progress.write("round 1/2 epoch 0.50 test accuracy 10.00%")
    progress.update(2, 1.0, 2.0, 1.0, 1.5, 0.1, 64, {"data": 0.1, "compute": 0.8, "sync": 0.1})
    # print() would give ["...", "\n", ...]; mpirun then logs "[1,0]<stdout>:" on a line of its own
    assert len(stream.calls) == 2 and all(c.endswith("\n") and c.count("\n") == 1 for c in stream.calls), stream.calls
    assert PROGRESS.match(stream.calls[1].rstrip("\n")), stream.calls[1]


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """One run of 2 epochs (80 rounds, one evaluation at the end) with progress lines every 0.5 s,
    its timing file held open by a notebook and read again and again while it runs: (stdout, the
    round counts each read saw, the timing file). Two tests read it: the readers, the progress."""
    from hist.io.timings import read_run

    out = tmp_path_factory.mktemp("live") / "live.h5"
    cmd = [BIN / "hist-train", "synthetic", *TINY, "--epochs", "2", "--log-every", "0.5", "--out", out]
    proc = subprocess.Popen([str(c) for c in cmd], env=mpi_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    hold = "import h5py, sys; f = h5py.File(sys.argv[1], 'r'); print('held', flush=True); sys.stdin.read()"
    notebook = None
    try:
        while not out.exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        notebook = subprocess.Popen([BIN / "python", "-c", hold, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert notebook.stdout.readline() == b"held\n"
        seen = []
        while proc.poll() is None:
            rounds = read_run(out).rounds["round"]
            assert rounds.tolist() == list(range(len(rounds)))
            seen.append(len(rounds))
        stdout, _ = proc.communicate(timeout=120)
        assert notebook.poll() is None  # it held the file to the end
    finally:
        for p in (proc, notebook):
            if p is not None and p.poll() is None:
                p.kill()
    assert proc.returncode == 0, stdout[-2000:]
    return stdout, seen, out


def test_a_reader_holding_the_live_timing_file_neither_stops_the_run_nor_is_refused(live_run):
    """A notebook keeps the timing file open all run long (h5py's default open: HDF5's shared
    lock) while `hist-report`'s reader reads it again and again: the run's appends go on to the
    end, and every read sees whole rounds in order."""
    from hist.io.timings import read_run

    _, seen, out = live_run
    with h5py.File(out, "r"):  # and a reader of this very process, holding it too, reads it as well
        final = read_run(out)
    assert final.attrs["status"] == "completed" and len(final.rounds["round"]) == 80  # 2 epochs of 40 rounds
    assert len(set(seen)) > 3  # the reads really overlapped the appends


def test_progress_lines_come_between_evaluations_at_the_interval_and_the_run_ends_with_its_summary(live_run):
    stdout, _, out = live_run
    lines = stdout.splitlines()
    progress = [(i, PROGRESS.match(line)) for i, line in enumerate(lines) if PROGRESS.match(line)]
    evals = [i for i, line in enumerate(lines) if "test accuracy" in line and line.startswith("round")]
    assert len(progress) >= 3, stdout  # a run of several seconds, a line at most every 0.5 s
    assert all(i < evals[0] for i, _ in progress[:-1]) and len(evals) == 1  # before the only evaluation
    rounds = [int(m.group(1)) for _, m in progress]
    assert rounds == sorted(set(rounds)) and rounds[-1] == int(progress[-1][1].group(2))  # the last round too
    assert "final test accuracy" in stdout
    for word in ("speed ", "training images/s", "MB sent per round", f"timings    {out}", "hist-report"):
        assert word in stdout, word
