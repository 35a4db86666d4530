"""Byte accounting and the block schedule: pure functions, shared by the live run, the bench
and the projection, so the three always count alike.

Bytes are counted logically per rank: an allreduce over k ranks of M bytes costs each rank
2(k-1)/k*M sent and received (ring); a broadcast costs the root (k-1)*M sent and every other
member M received. The block schedule is a pure function of two plans, so its bytes can be
counted without running MPI.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ..models.plan import Plan

# Values per chunk of the compressed codec (hist.comm.quantized): one bf16 scale each (int8,
# int4), and positions of one byte each under top-k.
CHUNK = 256
VALUE_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


def codec_nbytes(n: int, precision: str, k: int = CHUNK) -> int:
    """Packed bytes of `n` values (a multiple of CHUNK) at `precision`, keeping `k` a chunk."""
    chunks = n // CHUNK
    values = chunks * k
    scales = 2 * chunks if precision in ("int8", "int4") else 0
    positions = values if k < CHUNK else 0
    return scales + positions + -(-values * VALUE_BITS[precision] // 8)


def topk_per_chunk(fraction: float) -> int:
    """Values kept per chunk under `--shared-topk FRACTION` (0: all of them)."""
    return CHUNK if fraction <= 0 else max(1, min(CHUNK, round(fraction * CHUNK)))


def delivery_nbytes(numel: int, precision: str) -> int:
    """Bytes of one block delivery of `numel` values: fp32 as they are, else packed (padded to
    whole chunks; `quantized.pack_delivery`)."""
    return 4 * numel if precision == "fp32" else codec_nbytes(-(-numel // CHUNK) * CHUNK, precision)


def average_bytes(n: int, precision: str, k: int, world: int) -> float:
    """Bytes all ranks send to average `n` fp32 values over `world` ranks at `precision`, keeping
    `k` of each chunk: fp32 and fp16 by a ring allreduce, the packed kinds by
    `compressed_average_bytes`."""
    if k == CHUNK and precision in ("fp32", "fp16"):
        return world * ring_allreduce_bytes(n * VALUE_BITS[precision] // 8, world)
    return compressed_average_bytes(n, precision, k, world)


def compressed_average_bytes(n: int, precision: str, k: int, world: int) -> float:
    """Bytes all ranks send to average `n` values by `quantized.CompressedAverage`: an
    all-to-all of each rank's packed shards, then an allgather of the packed shard averages."""
    chunks = -(-n // CHUNK)
    shard = -(-chunks // world) * CHUNK
    return 2 * world * (world - 1) * codec_nbytes(shard, precision, k)


def traffic_precisions(method: str, shared: str, topk: float, blocks: str, momentum: bool) -> dict[str, str]:
    """What each kind of a run's traffic sends, in words: the timing file's `traffic` attribute,
    the end-of-run block and hist-report's note."""
    also = " and momentum" if momentum else ""
    if shared in ("int8", "int4") or topk > 0:
        kept = f", top-k {topk:g}" if topk > 0 else ""
        average = f"{shared} change{also}{kept}, packed with error feedback, all-to-all + allgather"
    elif shared == "fp16":
        average = f"fp16 change{also}, allreduce"
    else:
        average = f"fp32 weights{also}, allreduce"
    if method == "dp":
        return {"gradients": "fp32, allreduce every step"}
    if method == "local-sgd":
        return {"model": average}
    since = "weights" if blocks == "fp32" else "change"
    block = f"{blocks} {since}{also}{' since the last full sync' * (blocks != 'fp32')}, broadcast"
    return {"subnetwork gradients": "fp32, allreduce every step", "shared": average, "blocks": block}


def ring_allreduce_bytes(nbytes: float, k: int) -> float:
    """Bytes one rank sends (and receives) in a ring allreduce of `nbytes` over `k` ranks."""
    return 2 * (k - 1) / k * nbytes if k > 1 else 0.0


@dataclass
class Traffic:
    """Bytes this rank sent and received since the last `take`."""

    sent: float = 0.0
    received: float = 0.0

    def allreduce(self, nbytes: int, k: int) -> None:
        self.sent += ring_allreduce_bytes(nbytes, k)
        self.received += ring_allreduce_bytes(nbytes, k)

    def broadcast(self, nbytes: int, k: int, is_root: bool) -> None:
        if is_root:
            self.sent += (k - 1) * nbytes
        else:
            self.received += nbytes

    def exchange(self, nbytes: int, k: int) -> None:
        """An all-to-all or allgather in which each of `k` ranks holds `nbytes` for each rank:
        it sends k-1 of them and receives k-1."""
        self.sent += (k - 1) * nbytes
        self.received += (k - 1) * nbytes

    def take(self) -> tuple[float, float]:
        out = (self.sent, self.received)
        self.sent = self.received = 0.0
        return out


@dataclass(frozen=True)
class BlockOp:
    """One MPI collective over the global `ranks` carrying the concatenated `blocks`."""

    kind: str  # "allreduce" (average over holders) or "bcast" (from root)
    ranks: tuple[int, ...]
    root: int | None
    blocks: tuple[int, ...]


def schedule_blocks(plan: Plan, next_plan: Plan | None, ranks_per_subnet: int, aggregate: str) -> list[BlockOp]:
    """The transfers that bring every block's aggregate to the ranks that train it next.

    `next_plan=None` means everyone needs everything (evaluation, checkpoint, end). Blocks with
    the same senders and receivers travel together. Every rank derives the same list, in the
    same order, so the blocking collectives cannot deadlock.
    """
    g = ranks_per_subnet
    reduce_groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    bcast_groups: dict[tuple[int, tuple[int, ...]], list[int]] = defaultdict(list)
    for b in range(plan.n_blocks):
        holders = plan.holders(b)
        src = plan.owner[b]
        needers = next_plan.holders(b) if next_plan is not None else tuple(range(plan.subnets))
        if aggregate == "average" and len(holders) > 1:
            reduce_groups[holders].append(b)
            have = set(holders)
        else:
            have = {src}
        receivers = tuple(sorted(set(needers) - have))
        if receivers:
            bcast_groups[(src, receivers)].append(b)
    ops = []
    for j in range(g):  # column j: the j-th rank of each subnetwork talks to the j-th of the others
        for holders, blocks in sorted(reduce_groups.items()):
            ops.append(BlockOp("allreduce", tuple(s * g + j for s in holders), None, tuple(blocks)))
    for j in range(g):
        for (src, receivers), blocks in sorted(bcast_groups.items()):
            ranks = tuple(sorted([src * g + j] + [t * g + j for t in receivers]))
            ops.append(BlockOp("bcast", ranks, src * g + j, tuple(blocks)))
    return ops


def round_bytes(
    plan: Plan,
    next_plan: Plan | None,
    ranks_per_subnet: int,
    aggregate: str,
    block_nbytes: list[int],
    shared_nbytes: int,
    shared_precision: str = "fp32",
    shared_k: int = CHUNK,
    block_precision: str = "fp32",
) -> tuple[float, float]:
    """(sent, received) over all ranks for one IST round, by the same accounting as the live run
    (sizes in fp32 bytes; the shared average and the block deliveries at their precisions)."""
    world = plan.subnets * ranks_per_subnet
    t = Traffic()
    shared_sent = average_bytes(shared_nbytes // 4, shared_precision, shared_k, world)
    t.sent += shared_sent
    t.received += shared_sent  # every collective here receives what it sends, summed over ranks
    for r in range(world):
        for op in schedule_blocks(plan, next_plan, ranks_per_subnet, aggregate):
            if r in op.ranks:
                nbytes = sum(block_nbytes[b] for b in op.blocks)
                if op.kind == "bcast":
                    nbytes = delivery_nbytes(nbytes // 4, block_precision)
                if op.kind == "allreduce":
                    t.allreduce(nbytes, len(op.ranks))
                else:
                    t.broadcast(nbytes, len(op.ranks), r == op.root)
    return t.sent, t.received
