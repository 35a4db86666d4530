"""The only module that talks to Horovod and MPI.

Ranks 0..N-1 form S subnetworks of G = N / S contiguous ranks (the GPUs of one node share a
subnetwork). Inside a subnetwork gradients are averaged every step on its Horovod process
set; at the end of a round the shared parameters are averaged over all ranks (Horovod), and
each partitioned block travels by MPI only from the subnetwork(s) that trained it to the
subnetworks that train it next (`traffic.schedule_blocks`). This module knows tensors and
ranks, never data or files.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CollectiveError, HistError
from ..models.plan import Plan
from ..world import gpu_slot, world_info_from_env
from .quantized import pack_delivery, unpack_delivery
from .traffic import Traffic, delivery_nbytes, schedule_blocks


def _unflatten_into(flat: torch.Tensor, tensors) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def _contiguous(tensors) -> tuple[list[torch.Tensor], object]:
    """Tensors Horovod can reduce in place (it refuses non-contiguous ones, e.g. channels_last
    weights and their gradients), and a function that copies the results back."""
    sendable = [t if t.is_contiguous() else t.contiguous() for t in tensors]

    def copy_back():
        for t, c in zip(tensors, sendable):
            if c is not t:
                t.copy_(c)

    return sendable, copy_back


class ContiguousCompression:
    """Horovod's compression hook used only to hand it contiguous gradients: a channels_last
    gradient is reduced as a contiguous copy and written back into the original tensor."""

    @staticmethod
    def compress(tensor):
        return (tensor, None) if tensor.is_contiguous() else (tensor.contiguous(), tensor)

    @staticmethod
    def decompress(tensor, original):
        return tensor if original is None else original.copy_(tensor)


def loaded_mpi_library() -> str | None:
    """The path of the libmpi this process actually loaded (mpi4py's), not whichever MPI's
    tools happen to be first on PATH."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libmpi.so" in line or "libmpi_" in line}
    except OSError:
        return None
    paths = sorted(p for p in paths if p.startswith("/"))
    return paths[0] if paths else None


def cuda_aware_mpi() -> bool:
    """Whether the loaded MPI reads and writes GPU memory, asked after MPI started.

    Open MPI answers at run time through `MPIX_Query_cuda_support` (a CUDA build keeps it off
    unless OMPI_MCA_opal_cuda_support=true; a build flag says nothing about that). MPICH
    derivatives are switched on by the environment (Cray MPICH_GPU_SUPPORT_ENABLED, MVAPICH2
    MV2_USE_CUDA). `HIST_CUDA_AWARE_MPI=0|1` overrides.
    """
    forced = os.environ.get("HIST_CUDA_AWARE_MPI")
    if forced is not None:
        return forced == "1"
    if os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1" or os.environ.get("MV2_USE_CUDA") == "1":
        return True
    path = loaded_mpi_library()
    if path is None:
        return False
    import ctypes

    try:
        query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
    except OSError:
        return False
    return bool(query()) if query is not None else False


def resolve_block_transport(choice: str, device: torch.device, aware: bool) -> str:
    """What `--block-transport` means on this device, given whether every rank's MPI is
    CUDA-aware: `auto` is host memory unless that answer is yes."""
    if device.type != "cuda":
        return "host"  # the tensors already live in host memory: no staging either way
    if choice == "device" and not aware:
        raise CollectiveError(
            "--block-transport device needs a CUDA-aware MPI on every rank and this one is not "
            "(MPIX_Query_cuda_support says no; a CUDA build of Open MPI also needs "
            "OMPI_MCA_opal_cuda_support=true); use --block-transport host or auto"
        )
    return "device" if choice == "device" or (choice == "auto" and aware) else "host"


def horovod_gpu_problem(gpu_built: bool) -> str | None:
    """Why this Horovod cannot take GPU tensors (None: it can). A CPU-only build hands them to
    its CPU path (`Do*CudaOnCPU`), whose callback throws outside Horovod's error handling: the
    first collective crashes or hangs instead of failing."""
    if gpu_built:
        return None
    return (
        "the ranks train on CUDA devices but this Horovod was built without GPU support "
        "(hvd.cuda_built() and hvd.nccl_built() are False): rebuild it where nvcc and NCCL are found "
        "(pip uninstall horovod, then tools/bootstrap.sh, or tools/bootstrap.sh --horovod-only in a "
        "cluster environment; docs/install.md), or train on the CPU with --device cpu"
    )


class Pending:
    """Communication in flight; `wait()` completes it (and copies results into place)."""

    def __init__(self, *waits):
        self._waits = list(waits)

    def wait(self) -> None:
        for w in self._waits:
            w()
        self._waits = []


@dataclass
class Synchroniser:
    """Horovod and MPI state for one run; communicators are created once and reused."""

    subnets: int
    # Horovod's background thread wakes every cycle and negotiates with the other ranks over
    # MPI; on CPU-only ranks a short cycle takes time from training, a long one delays every
    # collective by up to a cycle, which dp pays each step. At 5 ms (2 ranks on 2 cores, ResNet-101
    # width 1/16, batch 32, 3 runs each) dp took 3.4-3.7 s an epoch against 4.5-5.0 s at 50 ms, and
    # IST 2.37-2.57 s against 2.46-2.85 s. None: Horovod's default, right for GPU ranks.
    cycle_time_ms: float | None = None
    # Open MPI busy-polls while it waits; on CPU-only ranks, yielding gives that core back to
    # the training thread (IST ResNet-101, 2 ranks on 2 cores: 0.28 -> 0.24 s per local step).
    yield_when_idle: bool = False
    # How IST blocks reach MPI ("host": staged through pinned buffers; "device": GPU memory
    # handed to a CUDA-aware MPI). Given as --block-transport (auto | host | device); after MPI
    # starts, `resolve_block_transport` turns it into host or device, agreed by every rank.
    block_transport: str = "host"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    traffic: Traffic = field(default_factory=Traffic)
    engine = "horovod"

    def __post_init__(self):
        # Set before MPI starts in this process; the user's own settings win.
        if self.cycle_time_ms is not None:
            os.environ.setdefault("HOROVOD_CYCLE_TIME", str(self.cycle_time_ms))
        if self.yield_when_idle:
            os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        # Bounded failure: a rank that stops answering ends the job instead of hanging it.
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", "30")
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "60")
        import horovod.torch as hvd
        from mpi4py import MPI

        self.MPI, self.hvd = MPI, hvd
        self.world = MPI.COMM_WORLD
        self.size, self.rank = self.world.Get_size(), self.world.Get_rank()
        launched = world_info_from_env().size
        if launched != self.size:
            raise HistError(
                f"the launcher started {launched} processes but MPI sees {self.size}; "
                f"launch with horovodrun (MPI controller), mpirun or srun --mpi=pmix, not --gloo"
            )
        if self.size % self.subnets:
            raise HistError(
                f"{self.size} processes cannot form {self.subnets} equal subnetworks; "
                f"use a process count that is a multiple of --subnets"
            )
        # Before Horovod starts: a build that cannot take GPU tensors ends every rank with one
        # line, and each rank takes its own GPU (made current, so Horovod's streams live on it).
        self.nccl = bool(hvd.nccl_built())  # NCCL reduces GPU tensors (and refuses two ranks on one GPU)
        if self.device.type == "cuda":
            problem = horovod_gpu_problem(hvd.cuda_built() or hvd.rocm_built())
            if self.world.allreduce(problem is not None, op=MPI.LOR):
                raise CollectiveError(problem or "another rank's Horovod was built without GPU support")
            views = self.world.allgather((world_info_from_env().host, os.environ.get("CUDA_VISIBLE_DEVICES")))
            self.device = torch.device("cuda", gpu_slot(views, self.rank) % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        self.ranks_per_subnet = self.size // self.subnets
        self.subnet = self.rank // self.ranks_per_subnet
        g = self.ranks_per_subnet
        sets = [hvd.ProcessSet(list(range(s * g, (s + 1) * g))) for s in range(self.subnets)]
        use_sets = 1 < g < self.size
        # Horovod: one process set per subnetwork, on the MPI world that mpi4py also uses.
        hvd.init(comm=self.world, process_sets=sets if use_sets else None)
        if hvd.size() != self.size:
            raise HistError(
                f"Horovod sees {hvd.size()} processes but MPI sees {self.size}; "
                f"launch with horovodrun or mpirun, not --gloo"
            )
        self.subnet_set = sets[self.subnet] if use_sets else hvd.global_process_set if g == self.size else None
        # MPI: whether device memory can go to MPI is asked of the library now loaded, and agreed.
        aware = self.device.type == "cuda" and bool(self.world.allreduce(cuda_aware_mpi(), op=MPI.LAND))
        self.block_transport = resolve_block_transport(self.block_transport, self.device, aware)
        self._comms: dict[tuple[int, ...], object] = {}
        # Staging buffers for the block transfers, one per operation in flight, reused every
        # round: no fresh array per operation.
        self._staging: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------ Horovod
    def broadcast_model(self, model: torch.nn.Module) -> None:
        tensors, copy_back = _contiguous(list(model.state_dict().values()))
        # Horovod: every rank starts from rank 0's weights (contiguous copies of channels_last ones).
        handles = [self.hvd.broadcast_async_(t, root_rank=0, name=f"hist.model.{i}") for i, t in enumerate(tensors)]
        for h in handles:
            self.hvd.synchronize(h)
        copy_back()

    def average_gradients(self, params) -> None:
        """Average the gradients of `params` over this rank's subnetwork (no-op for one rank)."""
        if self.subnet_set is None:
            return
        grads, copy_back = _contiguous([p.grad for p in params if p.grad is not None])
        # Horovod: one fused allreduce on the subnetwork's process set.
        self.hvd.grouped_allreduce_(grads, op=self.hvd.Average, process_set=self.subnet_set, name="hist.subnet_grads")
        copy_back()
        self.traffic.allreduce(sum(g.numel() * g.element_size() for g in grads), self.ranks_per_subnet)

    def start_average_over_world(self, params, name: str = "hist.world_average") -> Pending:
        """Start averaging parameters over all ranks; the caller overlaps other work, then waits."""
        if self.size == 1:
            return Pending()
        tensors, copy_back = _contiguous([p.data for p in params])
        # Horovod: asynchronous grouped allreduce over the global process set.
        handle = self.hvd.grouped_allreduce_async_(tensors, op=self.hvd.Average, name=name)
        self.traffic.allreduce(sum(t.numel() * t.element_size() for t in tensors), self.size)
        return Pending(lambda: self.hvd.synchronize(handle), copy_back)

    def average_over_world(self, params) -> None:
        """Average parameters over all ranks (shared IST parameters, or the whole local-SGD model)."""
        self.start_average_over_world(params).wait()

    def start_average_changes_over_world(self, params, starts, dtype=torch.float16) -> Pending:
        """Average parameters over all ranks by sending their change since `starts` (identical
        on every rank) in `dtype`: half the bytes in fp16, and the rounding only touches the
        small change of one round, never the weights themselves."""
        if self.size == 1:
            return Pending()
        changes = [(p.data - s).to(dtype).contiguous() for p, s in zip(params, starts)]
        # Horovod: asynchronous grouped allreduce of the fp16 changes over the global process set.
        handle = self.hvd.grouped_allreduce_async_(changes, op=self.hvd.Average, name="hist.world_changes")
        self.traffic.allreduce(sum(c.numel() * c.element_size() for c in changes), self.size)

        def apply():
            for p, s, c in zip(params, starts, changes):
                p.data.copy_(s + c.view_as(p).to(p.dtype))

        return Pending(lambda: self.hvd.synchronize(handle), apply)

    def alltoall_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        """Rank j receives the j-th of `size` equal parts of every rank's byte buffer, in rank
        order (packed compressed changes: `quantized.CompressedAverage`)."""
        send = buf.cpu().numpy()
        out = np.empty_like(send)
        # MPI: one all-to-all of raw bytes over the world.
        self.world.Alltoall([send, self.MPI.BYTE], [out, self.MPI.BYTE])
        self.traffic.exchange(buf.numel() // self.size, self.size)
        return torch.from_numpy(out).to(buf.device)

    def allgather_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        """Every rank's byte buffer (all the same size), concatenated in rank order."""
        send = buf.cpu().numpy()
        out = np.empty(self.size * send.size, dtype=np.uint8)
        # MPI: one allgather of raw bytes over the world.
        self.world.Allgather([send, self.MPI.BYTE], [out, self.MPI.BYTE])
        self.traffic.exchange(buf.numel(), self.size)
        return torch.from_numpy(out).to(buf.device)

    def sum_over_world(self, values) -> np.ndarray:
        """Sum a few floats over all ranks (evaluation counts, stop flags)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.size > 1:
            # Horovod: small allreduce of scalars.
            t = self.hvd.allreduce(t, op=self.hvd.Sum, name="hist.sum")
        return t.numpy()

    def distributed_optimizer(self, optimizer, model):
        # Horovod: data-parallel baseline, gradients averaged over all ranks during backward
        # (channels_last gradients handed over as contiguous copies).
        return self.hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), compression=ContiguousCompression
        )

    # ------------------------------------------------------------ MPI
    def _comm(self, ranks: tuple[int, ...]):
        comm = self._comms.get(ranks)
        if comm is None:
            group = self.world.Get_group().Incl(list(ranks))
            comm = self._comms[ranks] = self.world.Create_group(group)
        return comm

    def _stage(self, slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
        """The reusable buffer MPI reads and writes for this rank's `slot`-th operation of a
        round (one per operation in flight, grown as needed): pinned host memory (host
        transport; pinned only where there is a GPU to copy from) or device memory."""
        device = like.device if self.block_transport == "device" else torch.device("cpu")
        buf = self._staging.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != device:
            pin = device.type == "cpu" and like.device.type == "cuda"
            buf = self._staging[slot] = torch.empty(numel, dtype=like.dtype, device=device, pin_memory=pin)
        return buf[:numel]

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
        """Move each block's aggregate to the ranks that train it in `next_plan` (all if None).

        `block_params[b]` is every tensor that travels with block b (its parameters, and any
        optimizer state aggregated with them). `kinds` runs only the averaging among holders
        ("allreduce") or only the delivery ("bcast"), so that a step can sit between them.
        `nonblocking` starts MPI's non-blocking collectives and returns them in flight (every
        rank issues its operations in the one schedule order, so they cannot cross); otherwise
        they complete before this returns. `precision` fp16 or int8 delivers each block as its
        packed change since `references[b]`, which every rank holds (`quantized.pack_delivery`).
        """
        mine = [
            op
            for op in schedule_blocks(plan, next_plan, self.ranks_per_subnet, aggregate)
            if self.rank in op.ranks and op.kind in kinds
        ]
        # A block averaged among its holders is delivered from that average: the averages
        # complete (and land in the tensors) before any delivery is staged.
        self._start_block_ops([op for op in mine if op.kind == "allreduce"], block_params).wait()
        bcasts = [op for op in mine if op.kind == "bcast"]
        if precision != "fp32":
            pending = self._start_packed_bcasts(bcasts, block_params, precision, references)
        else:
            pending = self._start_block_ops(bcasts, block_params)
        if not nonblocking:
            pending.wait()
        return pending

    def _start_block_ops(self, ops, block_params) -> Pending:
        """Issue `ops` as MPI non-blocking collectives on their staging buffers."""
        requests, finish = [], []
        for op in ops:
            tensors = [p for b in op.blocks for p in block_params[b]]
            numel = sum(t.numel() for t in tensors)
            buf = self._stage(len(requests), numel, tensors[0])
            if buf.device == tensors[0].device:
                torch.cat([t.detach().reshape(-1) for t in tensors], out=buf)
            else:  # device -> pinned host
                buf.copy_(torch.cat([t.detach().reshape(-1) for t in tensors]), non_blocking=True)
            if tensors[0].device.type == "cuda":
                torch.cuda.current_stream(tensors[0].device).synchronize()  # MPI reads the buffer next
            comm = self._comm(op.ranks)
            k = len(op.ranks)
            mpi_buf = buf if buf.device.type == "cuda" else buf.numpy()
            # MPI: Open MPI has no non-blocking collectives on GPU buffers; device memory goes
            # through the blocking ones (the schedule order still keeps every rank in step).
            on_device = buf.device.type == "cuda"
            if op.kind == "allreduce":
                if on_device:
                    comm.Allreduce(self.MPI.IN_PLACE, mpi_buf, op=self.MPI.SUM)
                else:
                    requests.append(comm.Iallreduce(self.MPI.IN_PLACE, mpi_buf, op=self.MPI.SUM))
                self.traffic.allreduce(buf.numel() * buf.element_size(), k)
            else:
                if on_device:
                    comm.Bcast(mpi_buf, root=op.ranks.index(op.root))
                else:
                    requests.append(comm.Ibcast(mpi_buf, root=op.ranks.index(op.root)))
                self.traffic.broadcast(buf.numel() * buf.element_size(), k, self.rank == op.root)
            finish.append((buf, tensors, k if op.kind == "allreduce" else 1))

        def complete():
            self.MPI.Request.Waitall(requests)
            for buf, tensors, k in finish:
                if k > 1:
                    buf /= k
                _unflatten_into(buf.to(tensors[0].device, non_blocking=True), tensors)

        return Pending(complete)

    def _start_packed_bcasts(self, ops, block_params, precision, references) -> Pending:
        """Deliveries of packed changes: the root packs (and keeps what it sent), the others
        unpack against the same references when the bytes are in."""
        requests, finish = [], []
        for op in ops:
            tensors = [p for b in op.blocks for p in block_params[b]]
            refs = [t for b in op.blocks for t in references[b]]
            if self.rank == op.root:
                buf = pack_delivery(tensors, refs, precision)
            else:
                buf = torch.empty(delivery_nbytes(sum(t.numel() for t in tensors), precision), dtype=torch.uint8)
                finish.append((buf, tensors, refs))
            buf = buf.cpu()
            # MPI: non-blocking broadcast of the packed bytes from the block's owner.
            requests.append(self._comm(op.ranks).Ibcast(buf.numpy(), root=op.ranks.index(op.root)))
            self.traffic.broadcast(buf.numel(), len(op.ranks), self.rank == op.root)

        def complete():
            self.MPI.Request.Waitall(requests)
            for buf, tensors, refs in finish:
                unpack_delivery(buf, tensors, refs, precision)

        return Pending(complete)

    def check_same(self, value: int, what: str) -> None:
        """Fail clearly if ranks disagree on `value` (a plan digest, a config hash)."""
        values = self.world.allgather(value)
        if len(set(values)) > 1:
            odd = [r for r, v in enumerate(values) if v != values[0]]
            raise HistError(
                f"ranks disagree on the {what} (ranks {odd} differ from rank 0); "
                f"all ranks must run the same hist version with the same options"
            )

    def any_over_world(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (MPI: no Horovod cycle to wait for)."""
        return bool(self.world.allreduce(bool(flag), op=self.MPI.LOR)) if self.size > 1 else bool(flag)

    def close(self) -> None:
        """Nothing: Horovod and MPI shut down at the process's exit."""

    def gather(self, obj):
        """Rank 0 gets a list of every rank's `obj`; the others get None."""
        return self.world.gather(obj, root=0)

    def allgather(self, obj) -> list:
        """Every rank's `obj` (small Python objects: host names)."""
        return self.world.allgather(obj)

    def library_versions(self) -> dict:
        """Horovod's and the MPI library's versions, for the timing file (Open MPI's string ends
        in a NUL, which JSON would keep)."""
        mpi = self.MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip()
        return {"engine": self.engine, "horovod": horovod_version(), "mpi": mpi}


def horovod_version() -> str | None:
    """Horovod's version, or None where it is not installed."""
    try:
        import horovod
    except ImportError:
        return None
    return horovod.__version__


def abort_world_if_running(code: int = 1) -> None:
    """End every rank of an MPI job that has started, so that none waits for this one."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and world_info_from_env().size > 1:
        sys.stderr.flush()
        mpi.COMM_WORLD.Abort(code)
