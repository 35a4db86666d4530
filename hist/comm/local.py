"""One process, no Horovod and no MPI: the Synchroniser's interface where there is nothing to
talk to. A workstation with one GPU, a laptop or a login node runs `hist-train` through this
door without either library installed; every collective is the identity on one rank."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .traffic import Traffic


class _Done:
    """Communication that was never in flight."""

    def wait(self) -> None:
        pass


@dataclass
class LocalSynchroniser:
    """The one rank of a one-process run: rank 0 of 1, one subnetwork."""

    subnets: int = 1
    block_transport: str = "host"
    traffic: Traffic = field(default_factory=Traffic)
    rank: int = 0
    size: int = 1
    subnet: int = 0
    ranks_per_subnet: int = 1
    subnet_set = None
    nccl = False  # one rank never shares a GPU with another
    engine = "local"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def broadcast_model(self, model) -> None:
        pass

    def average_gradients(self, params) -> None:
        pass

    def start_average_over_world(self, params, name: str = "") -> _Done:
        return _Done()

    def average_over_world(self, params) -> None:
        pass

    def start_average_changes_over_world(self, params, starts, dtype=None) -> _Done:
        return _Done()

    def alltoall_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        return buf

    def allgather_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        return buf

    def sum_over_world(self, values) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def distributed_optimizer(self, optimizer, model):
        return optimizer

    def sync_blocks(self, block_params, plan, next_plan, aggregate, kinds=(), nonblocking=False, **packing) -> _Done:
        return _Done()  # one subnetwork holds every block: nothing moves

    def any_over_world(self, flag: bool) -> bool:
        return bool(flag)

    def close(self) -> None:
        pass

    def check_same(self, value: int, what: str) -> None:
        pass

    def gather(self, obj) -> list:
        return [obj]

    def allgather(self, obj) -> list:
        return [obj]

    def library_versions(self) -> dict:
        from .synchroniser import horovod_version

        return {"engine": self.engine, "horovod": horovod_version(), "mpi": "none (one process)"}
