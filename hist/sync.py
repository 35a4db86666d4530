"""Synchronisation: Horovod for gradients and shared parameters, MPI for layer-3 blocks.

Ranks 0..N-1 form S subnetworks of G = N / S contiguous ranks (the GPUs of one node share a
subnetwork). Inside a subnetwork gradients are averaged every step on its Horovod process
set; at the end of a round the shared parameters are averaged over all ranks (Horovod), and
each partitioned block travels by MPI only from the subnetwork(s) that trained it to the
subnetworks that train it next. The schedule of those block transfers is a pure function of
two plans (`schedule_blocks`), so its byte count can be computed without running MPI.

Bytes are counted logically per rank: an allreduce over k ranks of M bytes costs each rank
2(k-1)/k*M sent and received (ring); a broadcast costs the root (k-1)*M sent and every other
member M received. This module knows tensors and ranks, never data or files.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import HistError
from .plan import Plan
from .world import world_info_from_env


@dataclass
class Traffic:
    """Bytes this rank sent and received, and seconds it spent synchronising, since `reset`."""
    sent: float = 0.0
    received: float = 0.0

    def allreduce(self, nbytes: int, k: int) -> None:
        if k > 1:
            self.sent += 2 * (k - 1) / k * nbytes
            self.received += 2 * (k - 1) / k * nbytes

    def broadcast(self, nbytes: int, k: int, is_root: bool) -> None:
        if is_root:
            self.sent += (k - 1) * nbytes
        else:
            self.received += nbytes

    def take(self) -> tuple[float, float]:
        out = (self.sent, self.received)
        self.sent = self.received = 0.0
        return out


@dataclass(frozen=True)
class BlockOp:
    """One MPI collective over the global `ranks` carrying the concatenated `blocks`."""
    kind: str                 # "allreduce" (average over holders) or "bcast" (from root)
    ranks: tuple[int, ...]
    root: int | None
    blocks: tuple[int, ...]


def schedule_blocks(plan: Plan, next_plan: Plan | None, ranks_per_subnet: int,
                    aggregate: str) -> list[BlockOp]:
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


def round_bytes(plan: Plan, next_plan: Plan | None, ranks_per_subnet: int, aggregate: str,
                block_nbytes: list[int], shared_nbytes: int) -> tuple[float, float]:
    """(sent, received) over all ranks for one IST round, by the same accounting as the live run."""
    world = plan.subnets * ranks_per_subnet
    t = Traffic()
    for r in range(world):
        t.allreduce(shared_nbytes, world)
        for op in schedule_blocks(plan, next_plan, ranks_per_subnet, aggregate):
            if r in op.ranks:
                nbytes = sum(block_nbytes[b] for b in op.blocks)
                if op.kind == "allreduce":
                    t.allreduce(nbytes, len(op.ranks))
                else:
                    t.broadcast(nbytes, len(op.ranks), r == op.root)
    return t.sent, t.received


def _flatten(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflatten_into(flat: torch.Tensor, tensors) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(flat[offset:offset + n].view_as(t))
        offset += n


@dataclass
class Synchroniser:
    """Horovod and MPI state for one run; communicators are created once and reused."""
    subnets: int
    # Horovod's background thread wakes every cycle and negotiates with the other ranks over
    # MPI; on CPU-only ranks that takes cycles from training (2 ranks on 2 cores: local steps
    # 1.7x slower at 1 ms than at 50 ms). None: Horovod's default, right for GPU ranks.
    cycle_time_ms: float | None = None
    # Open MPI busy-polls while it waits; on CPU-only ranks, yielding gives that core back to
    # the training thread (IST ResNet-101, 2 ranks on 2 cores: 0.28 -> 0.24 s per local step).
    yield_when_idle: bool = False
    traffic: Traffic = field(default_factory=Traffic)

    def __post_init__(self):
        # Set before MPI starts in this process; the user's own settings win.
        if self.cycle_time_ms is not None:
            os.environ.setdefault("HOROVOD_CYCLE_TIME", str(self.cycle_time_ms))
        if self.yield_when_idle:
            os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        # Bounded failure: a rank that stops answering ends the job instead of hanging it.
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", "30")
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "60")
        from mpi4py import MPI
        import horovod.torch as hvd
        self.MPI, self.hvd = MPI, hvd
        self.world = MPI.COMM_WORLD
        self.size, self.rank = self.world.Get_size(), self.world.Get_rank()
        launched = world_info_from_env().size
        if launched != self.size:
            raise HistError(f"the launcher started {launched} processes but MPI sees {self.size}; "
                            f"launch with horovodrun (MPI controller), mpirun or srun --mpi=pmix, not --gloo")
        if self.size % self.subnets:
            raise HistError(f"{self.size} processes cannot form {self.subnets} equal subnetworks; "
                            f"use a process count that is a multiple of --subnets")
        self.ranks_per_subnet = self.size // self.subnets
        self.subnet = self.rank // self.ranks_per_subnet
        g = self.ranks_per_subnet
        sets = [hvd.ProcessSet(list(range(s * g, (s + 1) * g))) for s in range(self.subnets)]
        use_sets = 1 < g < self.size
        # Horovod: one process set per subnetwork, on the MPI world that mpi4py also uses.
        hvd.init(comm=self.world, process_sets=sets if use_sets else None)
        if hvd.size() != self.size:
            raise HistError(f"Horovod sees {hvd.size()} processes but MPI sees {self.size}; "
                            f"launch with horovodrun or mpirun, not --gloo")
        self.subnet_set = (sets[self.subnet] if use_sets else
                           hvd.global_process_set if g == self.size else None)
        self._comms: dict[tuple[int, ...], object] = {}

    # ------------------------------------------------------------ Horovod
    def broadcast_model(self, model: torch.nn.Module) -> None:
        # Horovod: every rank starts from rank 0's weights.
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def average_gradients(self, params) -> None:
        """Average the gradients of `params` over this rank's subnetwork (no-op for one rank)."""
        if self.subnet_set is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        # Horovod: one fused allreduce on the subnetwork's process set.
        self.hvd.grouped_allreduce_(grads, op=self.hvd.Average,
                                     process_set=self.subnet_set, name="hist.subnet_grads")
        self.traffic.allreduce(sum(g.numel() * g.element_size() for g in grads), self.ranks_per_subnet)

    def average_over_world(self, params) -> None:
        """Average parameters over all ranks (shared IST parameters, or the whole local-SGD model)."""
        if self.size == 1:
            return
        tensors = [p.data for p in params]
        # Horovod: grouped allreduce over the global process set.
        self.hvd.grouped_allreduce_(tensors, op=self.hvd.Average, name="hist.world_average")
        self.traffic.allreduce(sum(t.numel() * t.element_size() for t in tensors), self.size)

    def average_changes_over_world(self, params, starts, dtype=torch.float16) -> None:
        """Average parameters over all ranks by sending their change since `starts` (identical
        on every rank) in `dtype`: half the bytes in fp16, and the rounding only touches the
        small change of one round, never the weights themselves."""
        if self.size == 1:
            return
        changes = [(p.data - s).to(dtype) for p, s in zip(params, starts)]
        # Horovod: grouped allreduce of the fp16 changes over the global process set.
        self.hvd.grouped_allreduce_(changes, op=self.hvd.Average, name="hist.world_changes")
        self.traffic.allreduce(sum(c.numel() * c.element_size() for c in changes), self.size)
        for p, s, c in zip(params, starts, changes):
            p.data.copy_(s + c.to(p.dtype))

    def sum_over_world(self, values) -> np.ndarray:
        """Sum a few floats over all ranks (evaluation counts, stop flags)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.size > 1:
            # Horovod: small allreduce of scalars.
            t = self.hvd.allreduce(t, op=self.hvd.Sum, name="hist.sum")
        return t.numpy()

    def distributed_optimizer(self, optimizer, model):
        # Horovod: data-parallel baseline, gradients averaged over all ranks during backward.
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    # ------------------------------------------------------------ MPI
    def _comm(self, ranks: tuple[int, ...]):
        comm = self._comms.get(ranks)
        if comm is None:
            group = self.world.Get_group().Incl(list(ranks))
            comm = self._comms[ranks] = self.world.Create_group(group)
        return comm

    def sync_blocks(self, block_params: list[list[torch.Tensor]], plan: Plan,
                    next_plan: Plan | None, aggregate: str,
                    kinds: tuple[str, ...] = ("allreduce", "bcast")) -> None:
        """Move each block's aggregate to the ranks that train it in `next_plan` (all if None).

        `block_params[b]` is every tensor that travels with block b (its parameters, and any
        optimizer state aggregated with them). `kinds` runs only the averaging among holders
        ("allreduce") or only the delivery ("bcast"), so that a step can sit between them.
        """
        for op in schedule_blocks(plan, next_plan, self.ranks_per_subnet, aggregate):
            if self.rank not in op.ranks or op.kind not in kinds:
                continue
            tensors = [p for b in op.blocks for p in block_params[b]]
            device = tensors[0].device
            # MPI on host memory: works with any MPI, CUDA-aware or not.
            buf = np.ascontiguousarray(_flatten(tensors).cpu().numpy())
            comm = self._comm(op.ranks)
            k = len(op.ranks)
            if op.kind == "allreduce":
                comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
                buf /= k
                self.traffic.allreduce(buf.nbytes, k)
            else:
                root = op.ranks.index(op.root)
                comm.Bcast(buf, root=root)
                self.traffic.broadcast(buf.nbytes, k, self.rank == op.root)
            _unflatten_into(torch.from_numpy(buf).to(device), tensors)

    def check_same(self, value: int, what: str) -> None:
        """Fail clearly if ranks disagree on `value` (a plan digest, a config hash)."""
        values = self.world.allgather(value)
        if len(set(values)) > 1:
            odd = [r for r, v in enumerate(values) if v != values[0]]
            raise HistError(f"ranks disagree on the {what} (ranks {odd} differ from rank 0); "
                            f"all ranks must run the same hist version with the same options")

    def any_over_world(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (MPI: no Horovod cycle to wait for)."""
        return bool(self.world.allreduce(bool(flag), op=self.MPI.LOR)) if self.size > 1 else bool(flag)

    def gather(self, obj):
        """Rank 0 gets a list of every rank's `obj`; the others get None."""
        return self.world.gather(obj, root=0)

    def bcast_object(self, obj):
        return self.world.bcast(obj, root=0)

    def abort(self, code: int = 1) -> None:
        self.world.Abort(code)
