"""Helpers of the tests: where things are, and launching real commands and multi-process jobs.

Imported by the test modules (`from helpers import ...`); fixtures live in conftest.py.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sample_dir():
    """The real CIFAR-10 sample named by HIST_TEST_DATA (make test sets it), or None."""
    path = os.environ.get("HIST_TEST_DATA")
    return Path(path) if path and (Path(path) / "cifar-10-batches-py").is_dir() else None


def mpi_env(**extra):
    env = dict(
        os.environ,
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMP_NUM_THREADS="1",
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        # loopback only: the test machine has no other network worth trying
        OMPI_MCA_btl_tcp_if_include="lo",
        OMPI_MCA_oob_tcp_if_include="lo",
        OMPI_MCA_rmaps_base_oversubscribe="1",
        # more ranks than cores (4 on 2): a waiting rank gives its core up instead of polling,
        # which Open MPI does by itself only when it sees the oversubscription (-H host:N hides it)
        OMPI_MCA_mpi_yield_when_idle="1",
        HOROVOD_GLOO_IFACE="lo",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


# The markers of the test running now (set by conftest.py). `make test` runs the tests of one
# process two at a time, then those that launch ranks in turn, so that their ranks have the
# cores: a test that launches ranks must carry one of SERIAL.
MARKS: set[str] = set()
SERIAL = {"multiprocess", "multinode", "slurm"}
LAUNCHERS = {"mpirun", "torchrun", "horovodrun"}


def check_marked(cmd) -> None:
    if Path(str(cmd[0])).name in LAUNCHERS and not MARKS & SERIAL:
        raise AssertionError(f"this test launches ranks ({Path(str(cmd[0])).name}): mark it multiprocess")


def run(cmd, timeout=600, check=True, **env):
    """Run a command (list), returning the CompletedProcess; fail with its output if it fails."""
    check_marked(cmd)
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=mpi_env(**env), cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def horovodrun(n, *args, **kw):
    """The user's launcher itself: kept for the tests of what horovodrun does (its errors, --gloo, the README)."""
    return run([BIN / "horovodrun", "-np", n, "-H", f"localhost:{n}", *args], **kw)


# The mpirun line horovodrun runs for Open MPI on one host (`horovodrun --verbose` prints it).
HOROVOD_MPIRUN = (
    "mpirun --allow-run-as-root --tag-output -bind-to none -map-by slot -mca pml ob1 -mca btl ^openib".split()
)


def mpirun(n, *args, **kw):
    """n ranks under Horovod over Open MPI, started as horovodrun starts them.

    horovodrun spends about 5 s of every launch checking its own build in a subprocess before
    it runs this line; the tests that are not about the launcher run the line directly, which
    keeps the suite minutes shorter (its own tests keep `horovodrun`).
    """
    return run([*HOROVOD_MPIRUN, "-np", n, "-H", f"localhost:{n}", *args], **kw)


def options(**values) -> list[str]:
    """hist-train options from keywords: options(batch_size=16) gives ["--batch-size", "16"]."""
    out = []
    for key, value in values.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


# The smallest network that still trains: ResNet-34 (5 partitioned blocks) at width 1/16.
TINY_MODEL = options(arch="preact_resnet34", width=0.0625)
# ...and a run of it that takes seconds: 512 synthetic images, 4-step rounds, one thread a rank.
TINY_RUN = [*TINY_MODEL, *options(batch_size=32, threads=1, synthetic_size=512, local_iters=4, bn_batches=2)]


def spawn(n, *args, merge_output=False):
    """n ranks in the background, as `mpirun` starts them, in a session of its own (killable as a group)."""
    cmd = [*HOROVOD_MPIRUN, "-np", n, "-H", f"localhost:{n}", *args]
    check_marked(cmd)
    return subprocess.Popen(
        [str(c) for c in cmd],
        env=mpi_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_job(proc, out, timeout=60):
    """SIGKILL a spawned job and wait until its ranks are gone, not only mpirun.

    mpirun dies first; on a busy machine a rank may live a moment longer, still writing its
    files and holding the run lock a `--resume` must take (CI once read the file then and failed).
    """
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout)
    deadline = time.time() + timeout
    while rank_pids(out):  # pgrep -f matches no zombie: a zombie has no command line
        assert time.time() < deadline, f"ranks of {out} still alive {timeout} s after SIGKILL"
        time.sleep(0.1)


def rank_pids(out):
    """The rank processes (python running hist-train), not horovodrun or mpirun."""
    pattern = f"^[^ ]*python[^ ]* [^ ]*/hist-train .*{out}"
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return sorted(int(p) for p in found.stdout.split())


def torchrun(n, *args, **kw):
    """n ranks under torch.distributed, as torchrun starts them (a free port of its own: tests run side by side)."""
    return run([BIN / "torchrun", "--standalone", "--nproc-per-node", n, "--no-python", *args], **kw)


def hist_train(*args, **env):
    """`hist-train ARGS` in this process: the command object the console script calls, with the
    same prog name and standalone mode (no --threads: it would set this process's threads)."""
    from click.testing import CliRunner

    from hist.cli import train

    return CliRunner(env=env).invoke(train, [str(a) for a in args], prog_name="hist-train")


def one_line_error(result, *needles):
    """The command's outcome: exit 2 by SystemExit (an escaped exception would be a traceback),
    exactly one error line on stderr, holding every needle."""
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if "hist-train: error" in l]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- recorded results of hist-train
# Issue 41 rebuilt hist-train's loop on hist.IST; these fingerprints were recorded by the loop
# before the rebuild (HIST_RECORD_GOLDEN=1), so the rebuilt one must give the same round losses,
# evaluations and final weights, to the bit. Bits depend on the torch build and the CPU's
# kernels, so a fingerprint is compared only on the machine kind that recorded it.
GOLDEN_RUNS = ROOT / "tests" / "golden" / "train_fingerprints.json"


def machine_kind() -> str:
    import platform

    import torch

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    return f"torch {torch.__version__}, {platform.machine()}, {model}, {' '.join(isa)}"


def fingerprint(out) -> dict:
    """sha256s of a finished run: its round losses and its evaluations (the timing file), its
    final checkpoint's weights and its optimizer state."""
    import hashlib

    import h5py
    import torch

    def sha(arrays) -> str:
        h = hashlib.sha256()
        for a in arrays:
            h.update(
                a.tobytes()
                if hasattr(a, "tobytes")
                else a.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            )
        return h.hexdigest()[:16]

    with h5py.File(out, "r") as f:
        parts = {
            "losses": sha([f["rounds"]["loss"][:]]),
            "evals": sha([f["evals"][k][:] for k in ("test_loss", "test_accuracy")]),
        }
    state = torch.load(Path(out).with_suffix(".ckpt.pt"), map_location="cpu", weights_only=False)
    # BatchNorm's running statistics are left out: training normalises by batch, and every
    # evaluation recalibrates them (or normalises by batch), so no figure ever reads them.
    stats = ("running_mean", "running_var", "num_batches_tracked")
    parts["weights"] = sha([v for k, v in sorted(state["model"].items()) if not k.endswith(stats)])
    moments = []
    for _, s in sorted((state.get("optimizer") or {"state": {}})["state"].items()):
        moments += [v for _, v in sorted(s.items()) if torch.is_tensor(v)]
    parts["optimizer"] = sha(moments)
    return parts


def check_recorded(name: str, out) -> None:
    """The finished run `out` against the fingerprint recorded under `name` (see GOLDEN_RUNS)."""
    import json

    recorded = json.loads(GOLDEN_RUNS.read_text()) if GOLDEN_RUNS.exists() else {"machine": machine_kind(), "runs": {}}
    got = fingerprint(out)
    if os.environ.get("HIST_RECORD_GOLDEN"):
        recorded["runs"][name] = got
        GOLDEN_RUNS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    if recorded["machine"] != machine_kind():
        return  # other kernels, other bits: the determinism tests around each call still hold
    differ = [k for k, v in recorded["runs"][name].items() if got.get(k) != v]
    assert not differ, f"{name}: its {', '.join(differ)} differ from the run recorded before the rebuild"
