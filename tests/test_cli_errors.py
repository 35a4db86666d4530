"""Bad input: one line on stderr naming what is wrong, a non-zero exit, no traceback, no hang.

Each decision is tested in this process, through the real `hist-train` command as its console
script runs it (click's standalone mode, where the exit status travels in SystemExit): a
process of its own costs seconds of Python and torch imports and decides nothing more. The
process boundary itself keeps real tests: one process, and a job of ranks under horovodrun.
"""

import pytest

from helpers import BIN, TINY_MODEL, hist_train, horovodrun, mpirun, one_line_error, options, run

TINY = [*TINY_MODEL, *options(batch_size=16, synthetic_size=256, threads=1)]


@pytest.mark.parametrize(
    "args,needles",
    [
        (["mnist"], ["unknown dataset", "cifar10", "imagefolder"]),
        (["imagenet"], ["imagenet needs --data-dir"]),
        (["imagewoof", "--data-dir", "/nonexistent"], ["/nonexistent does not exist", "train/"]),
        (["synthetic", "--lr", "-0.1"], ["--lr"]),
        (["synthetic", "--batch-size", "0"], ["--batch-size"]),
        (["synthetic", "--local-iters", "0"], ["--local-iters"]),
        (["synthetic", "--epochs", "0"], ["--epochs"]),
        (["synthetic", "--synthetic-test-size", "-1"], ["--synthetic-test-size -1"]),
        (["synthetic", "--min-depth", "40"], ["--min-depth", "22"]),
        (["synthetic", "--arch", "preact_resnet18", "--method", "ist", "--subnets", "2"], ["--subnets 2"]),
        (["synthetic", "--subnets", "2"], ["1 processes", "multiple of --subnets"]),
        (["synthetic", "--batch-size", "5000"], ["--batch-size 5000", "4096"]),
        (["synthetic", "--out", "/etc/hostname/run.h5"], ["--out", "/etc/hostname"]),
    ],
)
def test_single_process_bad_input(args, needles, tmp_path):
    if "--out" not in args:
        args = [*args, "--out", tmp_path / "x.h5"]
    one_line_error(hist_train(*args), *needles)


def test_missing_data_folder(tmp_path):
    result = hist_train(
        "cifar100", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "x.h5", HIST_MIRROR="http://127.0.0.1:9"
    )  # a closed port: offline
    one_line_error(result, str(tmp_path / "nowhere"), "train, test", "--data-dir")


def test_truncated_data_file(tmp_path, cifar_sample):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in (cifar_sample / "cifar-10-batches-py").iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    blob = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(blob[:5000])
    one_line_error(hist_train("cifar10", "--data-dir", tmp_path, "--out", tmp_path / "x.h5"), "test_batch", "truncated")


def test_debug_shows_the_traceback(tmp_path):
    result = hist_train("synthetic", "--lr", "-1", "--debug", "--out", tmp_path / "x.h5")
    assert result.exit_code == 2 and "Traceback" in result.stderr and "--lr -1" in result.stderr


def test_a_real_process_says_one_line_and_exits_2(tmp_path):
    """The console script across a real process boundary: the line reaches the real stderr,
    the exit status the shell, and no traceback is printed."""
    proc = run([BIN / "hist-train", "synthetic", "--lr", "-0.1", "--out", tmp_path / "x.h5"], check=False, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines() == ["hist-train: error: --lr -0.1 must be positive"]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.multiprocess
def test_bad_input_on_every_rank_ends_the_job_without_hanging(tmp_path):
    """Under the line horovodrun runs (helpers.mpirun: its own 5 s self-check spared; the test
    below keeps horovodrun itself)."""
    proc = mpirun(
        2,
        BIN / "hist-train",
        "synthetic",
        *TINY,
        "--subnets",
        "4",
        "--out",
        tmp_path / "x.h5",
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "multiple of --subnets" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.multiprocess
def test_gloo_launch_is_refused_with_one_line(tmp_path):
    """IST uses mpi4py beside Horovod, so it needs an MPI launch; --gloo gives singleton MPI worlds."""
    proc = horovodrun(
        2, "--gloo", BIN / "hist-train", "synthetic", *TINY, "--out", tmp_path / "x.h5", check=False, timeout=120
    )
    assert proc.returncode != 0 and "not --gloo" in proc.stderr
    # horovodrun's own launcher prints a traceback when a rank fails; the ranks print none
    assert not [l for l in proc.stderr.splitlines() if l.startswith(("[0]", "[1]")) and "Traceback" in l]
