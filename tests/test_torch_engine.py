"""The second engine, torch.distributed (Gloo here), beside Horovod + MPI: which engine a
launcher implies, the same run to the bit under either, a checkpoint that crosses engines, four
ranks in two subnetworks, a run with neither Horovod nor MPI, and the one line a wrong pairing gets."""

import os
import socket
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_no_mpi import no_mpi  # noqa: F401 (a fixture: Horovod and mpi4py refused for real)

from hist.errors import CollectiveError
from hist.world import first_host, launcher, resolve_engine, torch_rendezvous, world_info_from_env

from helpers import BIN, TINY_RUN, check_recorded, mpirun, torchrun

TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}
MPIRUN = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
SRUN |= {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu3"}


def test_the_launcher_implies_the_engine():
    yes, no = (lambda: True), (lambda: False)
    assert [launcher(e) for e in (TORCHRUN, MPIRUN, SRUN, {})] == ["torchrun", "mpi", "srun", None]
    assert launcher({"MASTER_ADDR": "h", "RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert launcher({**SRUN, "TORCHELASTIC_RUN_ID": "x"}) == "torchrun"  # srun torchrun
    assert launcher({**SRUN, "PMIX_RANK": "3"}) == "srun"  # srun --mpi=pmix: either engine
    assert launcher({**SRUN, **MPIRUN}) == "mpi"  # mpirun inside an allocation
    assert launcher({"PMI_RANK": "1", "PMI_SIZE": "2"}) == "mpi"  # another process manager
    assert resolve_engine("auto", 2, TORCHRUN, yes) == "torch"
    assert resolve_engine("auto", 2, MPIRUN, yes) == "horovod"
    assert [resolve_engine("auto", 4, SRUN, h) for h in (yes, no)] == ["horovod", "torch"]
    assert resolve_engine("horovod", 1, TORCHRUN, no) == "local"  # one process needs no engine
    for choice, env, names in [("horovod", TORCHRUN, "horovodrun"), ("torch", MPIRUN, "torchrun")]:
        with pytest.raises(CollectiveError, match=names):
            resolve_engine(choice, 2, env, yes)
    with pytest.raises(CollectiveError, match="does not import"):
        resolve_engine("horovod", 2, MPIRUN, no)


def test_ranks_and_the_rendezvous_come_from_the_launcher():
    # torchrun inside srun: torchrun's numbering, not the node's task id
    w = world_info_from_env({**SRUN, **TORCHRUN})
    assert (w.rank, w.size, w.local_rank) == (1, 2, 1)
    assert first_host("gpu[07-09,12],cpu3") == "gpu07" and first_host("a1,a2") == "a1" and first_host("n") == "n"
    rdv = torch_rendezvous(SRUN)
    assert rdv == {
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(15000 + 123456 % 20000),
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
    }
    assert torch_rendezvous({**SRUN, "MASTER_ADDR": "mine"}) == {} and torch_rendezvous(TORCHRUN) == {}


def slow(test):
    """Real ranks under real launchers."""
    return pytest.mark.multiprocess(pytest.mark.slow(test))


def _train(method, split, out, *more):
    # one epoch of 2-step rounds (TINY_RUN's 4 are overridden): 4 rounds under shard, 8 under full
    args = ["synthetic", *TINY_RUN, "--epochs", "1", "--local-iters", "2", "--method", method, "--data-split", split]
    return [BIN / "hist-train", *args, "--log-every", "0", "--out", out, *more]


def _result(out):
    with h5py.File(out, "r") as f:
        loss, engine = f["rounds"]["loss"][:], f.attrs["engine"]
    return loss, torch.load(out.with_suffix(".ckpt.pt"), weights_only=True)["model"], engine


def _same(a, b) -> bool:
    """The same round losses and final weights, to the last bit."""
    same_weights = a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    return np.array_equal(a[0], b[0]) and same_weights


@slow
@pytest.mark.parametrize("method, split", [("dp", "shard"), ("local-sgd", "full")])
def test_the_same_run_under_either_engine_to_the_bit(tmp_path, method, split, no_mpi):  # noqa: F811
    """An average of two fp32 numbers is exact in either order, and both engines average as a
    sum scaled by 1/2; the torch run has Horovod and mpi4py refused, as on a machine without them."""
    hvd, tch = tmp_path / "hvd.h5", tmp_path / "torch.h5"
    mpirun(2, *_train(method, split, hvd))
    proc = torchrun(2, *_train(method, split, tch), **no_mpi)
    assert "engine     torch" in proc.stdout
    a, b = _result(hvd), _result(tch)
    check_recorded(f"{method}-{split}-horovod", hvd)
    assert (a[2], b[2]) == ("horovod", "torch") and _same(a, b)


@slow
def test_a_checkpoint_crosses_engines_and_ist_stays_exact(tmp_path):
    """IST's first two rounds under torch (blocks point to point, the shared parameters over the
    world), stopped, then resumed under Horovod: the weights of one Horovod run throughout."""
    ref, cut = tmp_path / "ref.h5", tmp_path / "cut.h5"
    mpirun(2, *_train("ist", "shard", ref))
    check_recorded("ist-shard-horovod", ref)
    proc = torchrun(2, *_train("ist", "shard", cut, "--stop-after-rounds", "2"), check=False)
    assert proc.returncode != 0 and torch.load(cut.with_suffix(".ckpt.pt"), weights_only=True)["round"] == 2
    mpirun(2, *_train("ist", "shard", cut, "--resume"))
    assert _same(_result(ref), _result(cut))


@slow
def test_four_ranks_two_subnetworks_of_two_under_torchrun(tmp_path):
    out = tmp_path / "ist4.h5"
    torchrun(4, *_train("ist", "full", out, "--subnets", "2"))
    check_recorded("ist-np4-s2-torch", out)
    with h5py.File(out, "r") as f:
        assert f.attrs["status"] == "completed" and f.attrs["world_size"] == 4 and f.attrs["subnets"] == 2
        sent = f["rounds"]["bytes_sent"][:]
    assert sent.shape[1] == 4 and (sent > 0).all()


@slow
def test_a_wrong_pairing_gets_one_line_naming_the_launcher(tmp_path):
    """Every rank finds it alike; rank 0 says it (torchrun then adds its own report of the exit)."""
    proc = torchrun(2, *_train("ist", "shard", tmp_path / "x.h5", "--backend", "horovod"), check=False)
    lines = [line for line in proc.stderr.splitlines() if "hist-train: error" in line]
    assert proc.returncode != 0 and len(lines) == 1 and "horovodrun" in lines[0], proc.stderr[-2000:]


def test_the_accuracy_suite_launches_the_engine_asked_for():
    from hist.analysis.suite import _with_new_defaults, on_local_ranks
    from hist.config import Config

    assert Path(on_local_ranks(2, ["hist-train"], "torch")[0]).name == "torchrun"
    horovod = on_local_ranks(2, ["hist-train"], "horovod")  # the line horovodrun runs, where Open MPI is
    assert Path(horovod[0]).name in ("mpirun", "horovodrun") and horovod[-1] == "hist-train"
    if Path(horovod[0]).name == "mpirun":
        assert horovod[horovod.index("-np") + 1] == "2" and "pml" in horovod
    assert on_local_ranks(1, ["hist-train"], "torch") == ["hist-train"]
    before = Config().as_dict()
    del before["backend"]  # a suite folder begun before --backend existed is continued, not refused
    assert _with_new_defaults(before) == Config().as_dict()


TEARDOWN = """
import atexit, sys
import torch.distributed as dist
atexit.register(lambda: print("at exit, initialised:", dist.is_initialized(), flush=True))  # runs last
from hist.comm.torchdist import TorchSynchroniser
sync = TorchSynchroniser(1)
assert sync.subnet_set is not None  # the one subnetwork is the world: a reference to the group
if sys.argv[1] == "close":
    sync.close()
    assert sync.subnet_set is None and not dist.is_initialized()
print("ran", flush=True)
"""


@pytest.mark.parametrize("ending", ["close", "exit"])
def test_gloo_is_torn_down_before_the_interpreter_ends(ending, tmp_path):
    """A Gloo worker thread that asks for the GIL while the interpreter finalises aborts a rank
    that finished (tests/parallel/quantized_check.py under torchrun beside a busy core: 1 run in
    30 with no teardown, 7 in 48 with the groups destroyed alone, 0 in 40 with the GIL let go
    after). The teardown (`_tear_down`: the groups destroyed, the
    GIL let go) runs before finalisation, whether the script calls close() or not. The abort
    itself is a race no single run can force, so this checks that the teardown runs. One rank,
    no launcher: the rendezvous variables are set by hand."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    out = subprocess.run(
        [BIN / "python", script, ending], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ran", "at exit, initialised: False"], out.stdout
