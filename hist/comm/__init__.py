"""Communication: the only floor that knows Horovod and MPI (`synchroniser`), and the byte
accounting and block schedule every other floor counts with (`traffic`, pure)."""

from .synchroniser import (
    Pending,
    Synchroniser,
    abort_world_if_running,
    cuda_aware_mpi,
    horovod_version,
    resolve_block_transport,
)
from .traffic import BlockOp, Traffic, ring_allreduce_bytes, round_bytes, schedule_blocks

__all__ = [
    "BlockOp",
    "Pending",
    "Synchroniser",
    "Traffic",
    "abort_world_if_running",
    "cuda_aware_mpi",
    "horovod_version",
    "resolve_block_transport",
    "ring_allreduce_bytes",
    "round_bytes",
    "schedule_blocks",
]
