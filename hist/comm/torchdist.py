"""The torch.distributed engine: the same synchroniser as Horovod + MPI, from PyTorch alone
(Gloo on CPUs, NCCL on GPUs), for jobs started by torchrun or srun.

Ranks form S subnetworks of G contiguous ranks as in `synchroniser`. Per-step gradients are
averaged on one group per subnetwork (created in the same order on every rank; a one-rank
subnetwork gets none); the shared parameters over the world group; IST blocks travel point to
point (`batch_isend_irecv`) following `traffic.schedule_blocks`, and an average among several
holders is an exchange of point-to-point messages summed in rank order, so no group is ever made
per set of ranks (NCCL allocates a communicator per group, and there can be 2^S sets).
Averages are sums scaled by 1/N, as Horovod's are, so two ranks agree with Horovod to the bit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..errors import HistError
from ..models.plan import Plan
from ..world import gpu_slot, torch_rendezvous, world_info_from_env
from .quantized import pack_delivery, unpack_delivery
from .synchroniser import Pending, _unflatten_into
from .traffic import Traffic, delivery_nbytes, schedule_blocks

# Into one tensor (renamed in torch 2.10; the old name warns there).
ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# A rank that dies or stops answering ends the others' collectives within this time.
TIMEOUT = timedelta(seconds=60)


def _flat(tensors) -> torch.Tensor:
    """One buffer of `tensors` in their logical order (channels_last ones included)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _GradientAverager:
    """Gradients averaged over the world during backward, as Horovod's DistributedOptimizer
    does: a hook per parameter marks its gradient ready, and each bucket (parameters in reverse
    order, about `bucket_bytes`) starts its allreduce once it and every bucket before it are
    ready, so every rank issues the same collectives in the same order. `synchronize()` waits
    and puts the averages in place; `step()` synchronizes unless inside `skip_synchronize()`."""

    def _hist_setup(self, params, size, bucket_bytes=4 << 20):
        self._size, self._skip = size, False
        self._buckets, current, nbytes = [], [], 0
        for p in reversed(params):
            current.append(p)
            nbytes += _nbytes(p)
            if nbytes >= bucket_bytes:
                self._buckets.append(current)
                current, nbytes = [], 0
        if current:
            self._buckets.append(current)
        self._bucket_of = {id(p): i for i, b in enumerate(self._buckets) for p in b}
        self._reset()
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    def _reset(self):
        self._waiting = [len(b) for b in self._buckets]
        self._started: list = []

    def _ready(self, p):
        self._waiting[self._bucket_of[id(p)]] -= 1
        while len(self._started) < len(self._buckets) and self._waiting[len(self._started)] == 0:
            self._start(len(self._started))

    def _start(self, i):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._buckets[i]]
        buf = _flat(grads)
        self._started.append((dist.all_reduce(buf, async_op=True), buf, i))

    def synchronize(self):
        while len(self._started) < len(self._buckets):  # a parameter without a gradient this step
            self._start(len(self._started))
        for work, buf, i in self._started:
            work.wait()
            buf.mul_(1.0 / self._size)
            for p in self._buckets[i]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _unflatten_into(buf, [p.grad for p in self._buckets[i]])
        self._reset()

    @contextlib.contextmanager
    def skip_synchronize(self):
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self, closure=None):
        if not self._skip:
            self.synchronize()
        return super().step(closure)


@dataclass
class TorchSynchroniser:
    """torch.distributed state for one run; groups are created once and reused."""

    subnets: int
    # IST blocks travel where the tensors are: host memory under Gloo, GPU memory under NCCL
    # (which reads nothing else); --block-transport has no staging choice to make here.
    block_transport: str = "host"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    traffic: Traffic = field(default_factory=Traffic)
    engine = "torch"

    def __post_init__(self):
        for name, value in torch_rendezvous().items():  # srun: the rendezvous from Slurm's variables
            os.environ.setdefault(name, value)
        world = world_info_from_env()
        self.size, self.rank = world.size, world.rank
        if self.size % self.subnets:
            raise HistError(
                f"{self.size} processes cannot form {self.subnets} equal subnetworks; "
                f"use a process count that is a multiple of --subnets"
            )
        self.nccl = self.device.type == "cuda"
        if self.nccl:
            # Each rank's own GPU, from what every rank sees (agreed over a store, before NCCL).
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1, self.size, self.rank == 0, TIMEOUT
            )
            store.set(f"view{self.rank}", json.dumps([world.host, os.environ.get("CUDA_VISIBLE_DEVICES")]))
            views = [tuple(json.loads(store.get(f"view{r}"))) for r in range(self.size)]
            self.device = torch.device("cuda", gpu_slot(views, self.rank) % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
            # NCCL: eager initialisation on this rank's GPU (subgroups split from it), and
            # asynchronous error handling so a dead peer ends this rank instead of hanging it.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            if not dist.is_initialized():  # a script of its own (hist.IST) may have started it
                dist.init_process_group("nccl", timeout=TIMEOUT, device_id=self.device)
            self.block_transport = "device"
        else:
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=TIMEOUT)
            self.block_transport = "host"
            # A script that ends without close() still tears Gloo down before the interpreter
            # finalises. (Not NCCL: its teardown can wait on a collective a failed peer left.)
            atexit.register(self._tear_down)
        if dist.get_world_size() != self.size:
            raise HistError(
                f"the launcher started {self.size} processes but torch.distributed sees "
                f"{dist.get_world_size()}; launch with torchrun --nproc-per-node N or srun"
            )
        self.ranks_per_subnet = g = self.size // self.subnets
        self.subnet = self.rank // g
        # One group per subnetwork of several ranks, created by every rank in the same order.
        groups = (
            [dist.new_group(list(range(s * g, (s + 1) * g))) for s in range(self.subnets)] if 1 < g < self.size else []
        )
        self.subnet_set = groups[self.subnet] if groups else dist.group.WORLD if g == self.size else None

    def _on_comm(self, t: torch.Tensor) -> torch.Tensor:
        """Small tensors live where the backend reads: the GPU for NCCL, the host for Gloo."""
        return t.to(self.device) if self.nccl else t

    # ------------------------------------------------------------ collectives
    def broadcast_model(self, model: torch.nn.Module) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in model.state_dict().values():  # one buffer a dtype: BatchNorm's counters stay integers
            by_dtype.setdefault(t.dtype, []).append(t)
        for tensors in by_dtype.values():
            buf = _flat(tensors)
            dist.broadcast(buf, src=0)  # every rank starts from rank 0's weights
            _unflatten_into(buf, tensors)

    def average_gradients(self, params) -> None:
        """Average the gradients of `params` over this rank's subnetwork (no-op for one rank)."""
        if self.subnet_set is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        buf = _flat(grads)
        dist.all_reduce(buf, group=self.subnet_set)
        buf.mul_(1.0 / self.ranks_per_subnet)
        _unflatten_into(buf, grads)
        self.traffic.allreduce(_nbytes(buf), self.ranks_per_subnet)

    def start_average_over_world(self, params, name: str = "") -> Pending:
        """Start averaging parameters over all ranks; the caller overlaps other work, then waits."""
        tensors = [p.data for p in params]
        if self.size == 1 or not tensors:
            return Pending()
        buf = _flat(tensors)
        work = dist.all_reduce(buf, async_op=True)
        self.traffic.allreduce(_nbytes(buf), self.size)

        def finish():
            work.wait()
            buf.mul_(1.0 / self.size)
            _unflatten_into(buf, tensors)

        return Pending(finish)

    def average_over_world(self, params) -> None:
        self.start_average_over_world(params).wait()

    def start_average_changes_over_world(self, params, starts, dtype=torch.float16) -> Pending:
        """Average parameters over all ranks by their change since `starts` (identical on every
        rank), sent in `dtype`: half the bytes in fp16, the rounding only on one round's change."""
        if self.size == 1:
            return Pending()
        params = list(params)
        changes = [(p.data - s).to(dtype) for p, s in zip(params, starts)]
        buf = _flat(changes)
        work = dist.all_reduce(buf, async_op=True)
        self.traffic.allreduce(_nbytes(buf), self.size)

        def apply():
            work.wait()
            buf.mul_(1.0 / self.size)
            _unflatten_into(buf, changes)
            for p, s, c in zip(params, starts, changes):
                p.data.copy_(s + c.view_as(p).to(p.dtype))

        return Pending(apply)

    def alltoall_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        """Rank j receives the j-th of `size` equal parts of every rank's byte buffer, in rank
        order (packed compressed changes: `quantized.CompressedAverage`)."""
        send = self._on_comm(buf.contiguous())
        out = torch.empty_like(send)
        dist.all_to_all_single(out, send)
        self.traffic.exchange(buf.numel() // self.size, self.size)
        return out.to(buf.device)

    def allgather_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        """Every rank's byte buffer (all the same size), concatenated in rank order."""
        send = self._on_comm(buf.contiguous())
        out = send.new_empty(self.size * send.numel())
        ALL_GATHER_SINGLE(out, send)
        self.traffic.exchange(buf.numel(), self.size)
        return out.to(buf.device)

    def sum_over_world(self, values) -> np.ndarray:
        """Sum a few floats over all ranks (evaluation counts, stop flags)."""
        t = self._on_comm(torch.tensor(values, dtype=torch.float64))
        if self.size > 1:
            dist.all_reduce(t)
        return t.cpu().numpy()

    def distributed_optimizer(self, optimizer, model):
        """The data-parallel optimizer: this optimizer, its gradients averaged over the world
        during backward (`_GradientAverager`, the interface of Horovod's DistributedOptimizer)."""
        cls = type(type(optimizer).__name__, (_GradientAverager, type(optimizer)), {})
        optimizer.__class__ = cls
        optimizer._hist_setup([p for p in model.parameters() if p.requires_grad], self.size)
        return optimizer

    # ------------------------------------------------------------ blocks, point to point
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
    ) -> Pending:
        """Move each block's aggregate to the ranks that train it in `next_plan` (all if None);
        the arguments mean what they mean to `Synchroniser.sync_blocks`. Each message carries
        its operation's place in the schedule as its tag, the same on every rank."""
        schedule = schedule_blocks(plan, next_plan, self.ranks_per_subnet, aggregate)
        mine = [(tag, op) for tag, op in enumerate(schedule) if self.rank in op.ranks and op.kind in kinds]
        # An average among holders completes before any delivery starts from it.
        self._average_among_holders([(t, op) for t, op in mine if op.kind == "allreduce"], block_params)
        pending = self._deliver([(t, op) for t, op in mine if op.kind == "bcast"], block_params, precision, references)
        if not nonblocking:
            pending.wait()
        return pending

    def _average_among_holders(self, ops, block_params) -> None:
        """Every holder sends its copy to the others and sums all copies in rank order, so the
        holders agree to the bit (two holders: the sum MPI's allreduce gives)."""
        p2p, finish = [], []
        for tag, op in ops:
            tensors = [p for b in op.blocks for p in block_params[b]]
            mine = _flat(tensors)
            copies = {self.rank: mine}
            for r in op.ranks:
                if r != self.rank:
                    copies[r] = torch.empty_like(mine)
                    p2p += [dist.P2POp(dist.isend, mine, r, tag=tag), dist.P2POp(dist.irecv, copies[r], r, tag=tag)]
                    self.traffic.broadcast(_nbytes(mine), 2, True)
                    self.traffic.broadcast(_nbytes(mine), 2, False)
            finish.append((tensors, copies, op.ranks))
        _wait_all(p2p)
        for tensors, copies, ranks in finish:
            total = copies[ranks[0]].clone()
            for r in ranks[1:]:
                total += copies[r]
            total /= len(ranks)
            _unflatten_into(total, tensors)

    def _deliver(self, ops, block_params, precision="fp32", references=None) -> Pending:
        """The root sends each operation's blocks to its other ranks; they receive in place.
        fp16 or int8: the root sends its packed change since `references` and keeps what it
        sent; the others unpack it against the same references (`quantized.pack_delivery`)."""
        p2p, finish = [], []
        for tag, op in ops:
            tensors = [p for b in op.blocks for p in block_params[b]]
            refs = [t for b in op.blocks for t in references[b]] if precision != "fp32" else None
            numel = sum(t.numel() for t in tensors)
            if self.rank == op.root:
                buf = pack_delivery(tensors, refs, precision) if refs else _flat(tensors)
                p2p += [dist.P2POp(dist.isend, buf, r, tag=tag) for r in op.ranks if r != op.root]
            else:
                if refs:
                    buf = torch.empty(delivery_nbytes(numel, precision), dtype=torch.uint8, device=tensors[0].device)
                else:
                    buf = torch.empty(numel, dtype=tensors[0].dtype, device=tensors[0].device)
                p2p.append(dist.P2POp(dist.irecv, buf, op.root, tag=tag))
                finish.append((buf, tensors, refs))
            self.traffic.broadcast(_nbytes(buf), len(op.ranks), self.rank == op.root)
        works = dist.batch_isend_irecv(p2p) if p2p else []

        def complete():
            for w in works:
                w.wait()
            for buf, tensors, refs in finish:
                if refs:
                    unpack_delivery(buf, tensors, refs, precision)
                else:
                    _unflatten_into(buf, tensors)

        return Pending(complete)

    # ------------------------------------------------------------ small objects
    def check_same(self, value: int, what: str) -> None:
        """Fail clearly if ranks disagree on `value` (a plan digest, a config hash)."""
        values = self.allgather(value)
        if len(set(values)) > 1:
            odd = [r for r, v in enumerate(values) if v != values[0]]
            raise HistError(
                f"ranks disagree on the {what} (ranks {odd} differ from rank 0); "
                f"all ranks must run the same hist version with the same options"
            )

    def any_over_world(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any."""
        return bool(self.sum_over_world([float(bool(flag))])[0]) if self.size > 1 else bool(flag)

    def close(self) -> None:
        """Every rank past its last collective, then the process groups torn down."""
        if dist.is_initialized():
            dist.barrier()
        self._tear_down()

    def _tear_down(self) -> None:
        """The process groups destroyed, then the GIL let go for a moment, with the interpreter
        still whole. A Gloo worker thread frees a finished collective's tensors under the GIL;
        if it asks for the GIL while the interpreter finalises, the thread is ended inside C++
        and the rank aborts ("terminate called without an active exception") after a run that
        succeeded. No collective here, so a rank whose peers are gone still gets out."""
        self.subnet_set = None
        if dist.is_initialized():
            dist.destroy_process_group()  # the groups live on (torch._dynamo holds them): no join
        time.sleep(0.01)

    def gather(self, obj):
        """Rank 0 gets a list of every rank's `obj`; the others get None."""
        everyone = self.allgather(obj)
        return everyone if self.rank == 0 else None

    def allgather(self, obj) -> list:
        """Every rank's `obj` (small Python objects: host names, round statistics)."""
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def library_versions(self) -> dict:
        """The engine and its library, for the timing file."""
        backend = dist.get_backend()
        if backend == "nccl":
            backend = f"nccl {'.'.join(map(str, torch.cuda.nccl.version()))}"
        return {"engine": "torch", "torch_distributed": backend, "horovod": None, "mpi": "none (torch.distributed)"}


def _wait_all(p2p) -> None:
    for w in dist.batch_isend_irecv(p2p) if p2p else []:
        w.wait()
