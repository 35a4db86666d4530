"""Who am I in the job: rank, size and local rank from Horovod, Open MPI, PMI or Slurm variables.

Read before any library initialises, so that the device can be chosen (the GPU of the local
rank) and errors can name the rank and host, whichever launcher started the process.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

_RANK = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "RANK")
_SIZE = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "WORLD_SIZE")
_LOCAL = ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK")


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


def world_info_from_env(env=None) -> WorldInfo:
    env = os.environ if env is None else env
    return WorldInfo(_first(_RANK, env, 0), _first(_SIZE, env, 1), _first(_LOCAL, env, 0), socket.gethostname())


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
