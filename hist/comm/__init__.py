"""Communication: the only floor that knows Horovod and MPI (`synchroniser`) and
torch.distributed (`torchdist`), the interface both offer (`interface.Sync`), their one-process
stand-in that needs none of them (`local`), and the byte accounting and block schedule every
other floor counts with (`traffic`, pure)."""

import torch

from .interface import Sync, Waitable
from .local import LocalSynchroniser
from .quantized import Codec, CompressedAverage
from .synchroniser import (
    Pending,
    Synchroniser,
    abort_world_if_running,
    cuda_aware_mpi,
    horovod_version,
    loaded_mpi_library,
    resolve_block_transport,
)
from .traffic import BlockOp, Traffic, ring_allreduce_bytes, round_bytes, schedule_blocks


def connect(subnets: int, world_size: int, engine: str = "horovod", **options) -> Sync:
    """This job's synchroniser for `engine` (`world.resolve_engine`): Horovod and MPI, or
    torch.distributed, beyond one process; for one, the stand-in, so a one-process run imports
    none of them."""
    if world_size == 1:
        return LocalSynchroniser(subnets)  # one rank: blocks never travel, host or not
    if engine == "torch":
        from .torchdist import TorchSynchroniser  # imported only when chosen: torch.distributed starts nothing

        return TorchSynchroniser(subnets, device=options.get("device", torch.device("cpu")))
    if options.get("device", torch.device("cpu")).type == "cpu":
        # CPU-only ranks: Horovod's background thread wakes rarely and MPI yields while it waits
        # (the Synchroniser's fields say what each buys); GPU ranks keep Horovod's defaults.
        options.setdefault("cycle_time_ms", 5)
        options.setdefault("yield_when_idle", True)
    return Synchroniser(subnets, **options)


__all__ = [
    "BlockOp",
    "Codec",
    "CompressedAverage",
    "LocalSynchroniser",
    "Pending",
    "Sync",
    "Synchroniser",
    "Traffic",
    "Waitable",
    "abort_world_if_running",
    "connect",
    "cuda_aware_mpi",
    "horovod_version",
    "loaded_mpi_library",
    "resolve_block_transport",
    "ring_allreduce_bytes",
    "round_bytes",
    "schedule_blocks",
]
