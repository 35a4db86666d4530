"""Who am I in the job: rank, size and local rank from Horovod, Open MPI, PMI, Slurm or
torchrun variables, and which engine (Horovod + MPI, or torch.distributed) the launcher implies.

Read before any library initialises, so that the device can be chosen (the GPU of the local
rank) and errors can name the rank and host, whichever launcher started the process.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass

from .errors import CollectiveError

_RANK = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "RANK")
_SIZE = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "WORLD_SIZE")
_LOCAL = ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK")
# torchrun's own numbering, read first under it: `srun torchrun` also sets SLURM_PROCID (the node's)
_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# an MPI launcher's own environment (horovodrun, mpirun), and what an MPI plugin of srun or
# another process manager adds (PMIx, PMI)
_MPIRUN = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK")
_PMI = ("PMIX_RANK", "PMI_RANK")


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    size: int
    local_rank: int
    host: str

    def where(self) -> str:
        return f"rank {self.rank} on {self.host}"


def _first(names, env, default: int) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return default


def under_launcher(env=None) -> bool:
    """Whether a launcher (horovodrun, mpirun, srun) started this process: then standard output
    is the launcher's (mpirun hands ranks a pseudo-terminal even when the job's log is a file)."""
    env = os.environ if env is None else env
    return any(env.get(name) not in (None, "") for name in (*_RANK, *_SIZE))


def launcher(env=None) -> str | None:
    """Which launcher started this process: "torchrun", "mpi" (horovodrun, mpirun, another PMI
    process manager), "srun" (a job step, with an MPI plugin or without: Slurm's variables give
    torch its rendezvous either way), or None (none: one process)."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    if any(env.get(name) for name in _MPIRUN):  # mpirun inside an allocation too
        return "mpi"
    if env.get("SLURM_PROCID") and env.get("SLURM_STEP_ID") is not None:
        return "srun"
    if any(env.get(name) for name in _PMI):
        return "mpi"
    if all(env.get(name) for name in ("MASTER_ADDR", "RANK", "WORLD_SIZE")):
        return "torchrun"
    return None


def world_info_from_env(env=None) -> WorldInfo:
    env = os.environ if env is None else env
    if launcher(env) == "torchrun":
        rank, size, local = ((name, *names) for name, names in zip(_TORCHRUN, (_RANK, _SIZE, _LOCAL)))
    else:
        rank, size, local = _RANK, _SIZE, _LOCAL
    return WorldInfo(_first(rank, env, 0), _first(size, env, 1), _first(local, env, 0), socket.gethostname())


def _importable(name: str) -> bool:
    """Whether `name` can be found, without importing it (which would start MPI)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def horovod_importable() -> bool:
    return _importable("horovod.torch") and _importable("mpi4py")


def resolve_engine(choice: str, world_size: int, env=None, horovod_available=horovod_importable) -> str:
    """The engine of this run: "local" for one process, else "horovod" or "torch" (--backend,
    auto: the launcher's). A launcher that cannot start the engine asked for gets one line
    naming the one that can, the same on every rank."""
    if world_size == 1:
        return "local"
    env = os.environ if env is None else env
    how = launcher(env)
    if choice == "auto":
        if how == "torchrun":
            return "torch"
        if how == "srun":
            return "horovod" if horovod_available() else "torch"
        return "horovod"
    if choice == "horovod" and how == "torchrun":
        raise CollectiveError(
            "--backend horovod cannot run under torchrun (it starts no MPI job); launch with "
            "horovodrun -np N, mpirun or srun --mpi=pmix, or use --backend torch (or auto)"
        )
    if choice == "torch" and how == "mpi":
        raise CollectiveError(
            "--backend torch cannot run under horovodrun or mpirun (they set no torch rendezvous); "
            "launch with torchrun --nproc-per-node N --no-python hist-train ... or srun without "
            "--mpi, or use --backend horovod (or auto)"
        )
    if choice == "horovod" and not horovod_available():
        raise CollectiveError(
            "--backend horovod but Horovod or mpi4py does not import here; install them "
            "(docs/install.md) or use --backend torch under torchrun or srun"
        )
    return choice


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("gpu[07-09,12],cpu3" -> "gpu07")."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        return nodelist
    prefix, ranges = m.groups()
    return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "")


def torch_rendezvous(env=None) -> dict[str, str]:
    """torch.distributed's env:// rendezvous under srun, from Slurm's variables: rank 0 on the
    first host of the allocation, a port derived from the job id (two jobs sharing a first host
    differ), RANK/WORLD_SIZE/LOCAL_RANK from the task. Empty where a launcher already set it."""
    env = os.environ if env is None else env
    if launcher(env) != "srun" or env.get("MASTER_ADDR"):
        return {}
    job = int(env.get("SLURM_JOB_ID") or 0)
    return {
        "MASTER_ADDR": first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"),
        "MASTER_PORT": str(env.get("MASTER_PORT") or 15000 + job % 20000),
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }


def gpu_slot(views: list[tuple[str, str | None]], rank: int) -> int:
    """Which of the GPUs rank `rank` sees is its own, from every rank's (host,
    CUDA_VISIBLE_DEVICES): its place among the ranks of its host that see the same GPUs.

    Not the local rank: a binding can show ranks of one host different GPU sets, each numbered
    from 0 (srun --gpu-bind=closest on a 2-socket, 8-GPU node with the cyclic distribution:
    tasks 0, 2, 4, 6 see GPUs 0-3, tasks 1, 3, 5, 7 GPUs 4-7), where local rank % 4 puts two
    tasks on one GPU. With one view per host the two agree."""
    return views[:rank].count(views[rank])


def cpu_description() -> dict:
    """The processor by name and the instruction set torch's kernels use: runs on VMs of one
    kind can land on different processors, whose kernels round differently, so a figure names it."""
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"cpu": name, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
