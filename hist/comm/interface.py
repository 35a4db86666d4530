"""What every synchroniser offers (Horovod + MPI, torch.distributed, the one-process stand-in),
declared once: the methods, the engine and the files see only this."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..models.plan import Plan
from .traffic import Traffic


class Waitable(Protocol):
    """Communication in flight; `wait()` completes it and puts the results in place."""

    def wait(self) -> None: ...


class Sync(Protocol):
    """One rank's view of the job: who it is, and the collectives the methods use."""

    engine: str  # "horovod", "torch" or "local": named in the timing file and the end-of-run block
    subnets: int
    rank: int
    size: int
    subnet: int
    ranks_per_subnet: int
    block_transport: str  # "host" or "device": where IST blocks sit while they travel
    nccl: bool  # NCCL reduces GPU tensors (it refuses two ranks on one GPU)
    device: torch.device
    traffic: Traffic

    def broadcast_model(self, model: torch.nn.Module) -> None: ...

    def average_gradients(self, params) -> None: ...

    def start_average_over_world(self, params, name: str = "") -> Waitable: ...

    def average_over_world(self, params) -> None: ...

    def start_average_changes_over_world(self, params, starts, dtype=torch.float16) -> Waitable: ...

    def alltoall_bytes(self, buf: torch.Tensor) -> torch.Tensor: ...

    def allgather_bytes(self, buf: torch.Tensor) -> torch.Tensor: ...

    def sum_over_world(self, values) -> np.ndarray: ...

    def distributed_optimizer(self, optimizer, model): ...

    def sync_blocks(
        self,
        block_params: list[list[torch.Tensor]],
        plan: Plan,
        next_plan: Plan | None,
        aggregate: str,
        kinds: tuple[str, ...] = ("allreduce", "bcast"),
        nonblocking: bool = False,
        precision: str = "fp32",
        references: list[list[torch.Tensor]] | None = None,
    ) -> Waitable: ...

    def any_over_world(self, flag: bool) -> bool: ...

    def close(self) -> None:
        """The job's last collective, on every rank, after the run."""
        ...

    def check_same(self, value: int, what: str) -> None: ...

    def gather(self, obj) -> list | None: ...

    def allgather(self, obj) -> list: ...

    def library_versions(self) -> dict: ...
