"""Communication: the only floor that knows Horovod and MPI (`synchroniser`), and the byte
accounting and block schedule every other floor counts with (`traffic`, pure)."""

from .synchroniser import Synchroniser, abort_world_if_running, horovod_version
from .traffic import BlockOp, Traffic, ring_allreduce_bytes, round_bytes, schedule_blocks

__all__ = [
    "BlockOp",
    "Synchroniser",
    "Traffic",
    "abort_world_if_running",
    "horovod_version",
    "ring_allreduce_bytes",
    "round_bytes",
    "schedule_blocks",
]
