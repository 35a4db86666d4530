"""Batches of image-folder sets too large for the device: decoded from their files by worker
processes a few batches ahead, sent to the device as uint8 and normalised there. The interface,
the sharding and the seeding are those of `DeviceLoader`, so the training loop cannot tell
them apart, and a resumed run sees the very batches it would have seen."""

from __future__ import annotations

import math
import multiprocessing
import queue
import sys
import types
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HistError
from .decode import DecodeError, decode_chunk, serve
from .folders import FolderSplit
from .order import calibration_order, epoch_shard, images_per_rank
from .sources import STATS


class StreamingLoader:
    """An image-folder split read from disk; each rank's images per epoch as `epoch_shard` draws them.

    Sharding is DeviceLoader's: under `shard` each epoch a permutation (identical on all ranks)
    is cut into `world` disjoint shards of floor(N / world) images, under `full` every rank
    passes all N in its own order; each rank's images are cut into full batches. A
    training image gets a random-resized crop and a flip drawn from (seed, rank, step, its place
    in the batch) alone; evaluation images are resized to `resize` and centre-cropped to `crop`.
    `workers` processes decode (0: in this process); call `close()` (or use `with`) to end them.
    """

    def __init__(
        self,
        split: FolderSplit,
        dataset: str,
        batch_size: int,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world: int = 1,
        augment: bool = True,
        data_split: str = "shard",
        crop: int = 224,
        resize: int = 256,
        workers: int = 4,
        prefetch: int = 2,
    ):
        self.split = split
        self.root = str(split.root)
        mean, std = STATS[dataset]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world, self.data_split = rank, world, data_split
        self.augment, self.crop, self.resize = augment, crop, resize
        self.workers, self.prefetch = workers, prefetch
        self.memory_format = torch.contiguous_format  # torch.channels_last for NHWC models
        self.shard_size = images_per_rank(len(split), world, data_split)
        self.steps_per_epoch = self.shard_size // batch_size  # 0 when the batch exceeds the shard
        self._epoch, self._shard = -1, None
        self._pool: _Workers | None = None  # started at the first batch
        self._pending: dict[int, _Pending] = {}  # submitted batches not yet handed out
        self._tickets = 0
        self._ahead: dict[int, int] = {}  # training step -> ticket of its prefetched batch
        self._next_step = None
        self._staging = _Staging(device)

    def __len__(self) -> int:
        return len(self.split)

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's image indices (on the CPU) for `epoch`, as DeviceLoader cuts them."""
        if epoch != self._epoch:
            self._shard = epoch_shard(len(self.split), self.seed, epoch, self.rank, self.world, self.data_split)
            self._epoch = epoch
        return self._shard

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `step` of this rank's stream (epochs follow one another), augmented and normalised;
        the next `prefetch` steps are decoded meanwhile."""
        if self.steps_per_epoch == 0:
            raise HistError(
                f"batch size {self.batch_size} exceeds the {self.shard_size} images of a rank's shard; use a smaller one"
            )
        if step != self._next_step:  # the first step, a resume or a jump: what is ahead is for other steps
            self._abandon(self._ahead.values())
            self._ahead.clear()
        ticket = self._ahead.pop(step, None)
        if ticket is None:
            ticket = self._submit_step(step)
        if self.workers > 0:
            for ahead in range(step + 1, step + 1 + self.prefetch):
                if ahead not in self._ahead:
                    self._ahead[ahead] = self._submit_step(ahead)
        self._next_step = step + 1
        return self._to_device(*self._wait(ticket))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC on the device to float NCHW, standardised with the dataset's statistics."""
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)  # in uint8: 4x cheaper than in float
        return ((x.float().div_(255) - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def calibration_batches(self, n_batches: int, first: int = 0):
        """Unaugmented batches `first`, `first` + 1, ... of a fixed permutation of the whole split
        (wrapping around), the same on every rank for the same `first`."""
        order = calibration_order(len(self.split), self.seed).numpy()
        count = len(order) // self.batch_size
        batches = ((i % count) * self.batch_size for i in range(first, first + min(n_batches, count)))
        yield from self._stream(order[s : s + self.batch_size] for s in batches)

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """Contiguous slice `rank` of the whole split, unaugmented, in batches."""
        n = len(self.split)
        lo, hi = n * rank // world, n * (rank + 1) // world
        yield from self._stream(np.arange(s, min(s + batch_size, hi)) for s in range(lo, hi, batch_size))

    def close(self) -> None:
        """End the workers (idempotent; also done when the loader is collected or at exit)."""
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        self._pending.clear()
        self._ahead.clear()
        self._next_step = None

    def __enter__(self) -> StreamingLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ the pipeline

    def _submit_step(self, step: int) -> int:
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.shard(epoch)[i * self.batch_size : (i + 1) * self.batch_size].numpy()
        seed = self.seed % (1 << 64)
        keys = [(seed, self.rank, step, j) for j in range(len(idx))] if self.augment else [None] * len(idx)
        return self._submit(idx, keys)

    def _submit(self, idx: np.ndarray, keys: list) -> int:
        """Queue the decoding of images `idx` (in chunks, for several workers); a ticket to wait on."""
        ticket = self._tickets = self._tickets + 1
        files = self.split.files
        paths = [f"{self.root}/{files[k]}" for k in idx]
        labels = self.split.labels[idx]
        if self.workers == 0:
            try:
                self._pending[ticket] = _Pending([decode_chunk(paths, keys, self.crop, self.resize)], labels, 0)
            except DecodeError as e:
                raise _unreadable(*e.args) from None
            return ticket
        if self._pool is None:
            self._pool = _Workers(self.workers)
        size = min(64, max(1, math.ceil(len(idx) / (2 * self.workers))))
        chunks = range(0, len(idx), size)
        self._pending[ticket] = _Pending([None] * len(chunks), labels, len(chunks))
        for c, s in enumerate(chunks):
            self._pool.tasks.put((ticket, c, paths[s : s + size], keys[s : s + size], self.crop, self.resize))
        return ticket

    def _wait(self, ticket: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The decoded chunks of `ticket`; results of other batches that arrive first are kept."""
        pending = self._pending[ticket]
        while pending.missing:
            try:
                got, chunk, payload = self._pool.results.get(timeout=1.0)
            except queue.Empty:
                self._pool.check_alive()
                continue
            other = self._pending.get(got)
            if other is None:
                continue  # abandoned
            if isinstance(payload, tuple):
                self._pending.pop(got)
                raise _unreadable(*payload[1:])
            other.parts[chunk] = payload
            other.missing -= 1
        del self._pending[ticket]
        return pending.parts, pending.labels

    def _stream(self, batches):
        """Unaugmented batches of the given indices, in order, `prefetch` batches ahead."""
        window = self.prefetch + 1 if self.workers > 0 else 1
        inflight: deque[int] = deque()
        batches = iter(batches)
        try:
            while True:
                while len(inflight) < window:
                    idx = next(batches, None)
                    if idx is None:
                        break
                    inflight.append(self._submit(idx, [None] * len(idx)))
                if not inflight:
                    return
                yield self._to_device(*self._wait(inflight.popleft()))
        finally:
            self._abandon(inflight)

    def _abandon(self, tickets) -> None:
        for ticket in list(tickets):
            self._pending.pop(ticket, None)  # its results are dropped when they arrive

    def _to_device(self, parts: list[np.ndarray], labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._staging.send(parts, labels)
        return self.normalise(x), y


@dataclass
class _Pending:
    parts: list  # decoded (n, crop, crop, 3) uint8 chunks, None until they arrive
    labels: np.ndarray
    missing: int = 0


def _unreadable(path: str, reason: str) -> HistError:
    return HistError(f"cannot decode image {path} ({reason}); remove or replace the file")


class _Workers:
    """Decoding processes started by spawning a fresh interpreter: the training process runs
    MPI, which does not survive fork(). Daemons, so they end with this process; they also end
    on their own if this process is killed."""

    def __init__(self, n: int):
        ctx = multiprocessing.get_context("spawn")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.tasks.cancel_join_thread()  # never wait at exit to hand tasks to workers that are gone
        self.procs = [
            ctx.Process(target=serve, args=(self.tasks, self.results), name=f"hist-decode-{i}", daemon=True)
            for i in range(n)
        ]
        with _main_module_hidden():
            for p in self.procs:
                p.start()
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.tasks, self.results)

    def check_alive(self) -> None:
        for p in self.procs:
            if p.exitcode is not None:
                why = (
                    "was killed (out of memory?)"
                    if p.exitcode == -9
                    else "was terminated (SIGTERM): the job is being ended"
                    if p.exitcode == -15
                    else f"died of signal {-p.exitcode}"
                    if p.exitcode < 0
                    else f"exited with code {p.exitcode}"
                )
                raise HistError(f"image decoding worker {p.name} (pid {p.pid}) {why}; use fewer workers or restart")

    def stop(self) -> None:
        self._finalizer()


@contextmanager
def _main_module_hidden():
    """A spawned child re-runs the parent's main module before it starts its work. The workers
    need nothing from it, and it may import torch (seconds per worker) or mpi4py (whose import
    calls MPI_Init, which fails in a process mpirun did not launch): while the workers start,
    the main module is a blank one, which spawn leaves alone."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _stop(procs, tasks, results) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    for q in (tasks, results):
        q.cancel_join_thread()
        q.close()


class _Staging:
    """Host to device: on CUDA through two reused pairs of pinned buffers (pixels, labels), so
    both copies run asynchronously (non_blocking) while the next batch is assembled in the
    other pair; the event that marks a pair's copies done lives on this rank's own GPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.buffers: list[dict[str, torch.Tensor]] = [{}, {}]
        self.copied: list = [None, None]  # CUDA event after each pair's last copies
        self.turn = 0

    def _pinned(self, k: int, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers[k].get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype:
            buf = self.buffers[k][name] = torch.empty(size, dtype=dtype, pin_memory=True)
        return buf[:size]

    def send(self, parts: list[np.ndarray], labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        n = sum(len(p) for p in parts)
        shape = (n, *parts[0].shape[1:])
        if not self.cuda:
            host = parts[0] if len(parts) == 1 else np.concatenate(parts)
            return torch.from_numpy(host).to(self.device), torch.from_numpy(np.ascontiguousarray(labels))
        k, self.turn = self.turn, 1 - self.turn
        if self.copied[k] is not None:
            self.copied[k].synchronize()  # its previous batch is on the device
        host = self._pinned(k, "pixels", math.prod(shape), torch.uint8).view(shape)
        np.concatenate(parts, out=host.numpy())
        y_host = self._pinned(k, "labels", len(labels), torch.int64)
        y_host.numpy()[:] = labels
        x = host.to(self.device, non_blocking=True)
        y = y_host.to(self.device, non_blocking=True)
        self.copied[k] = torch.cuda.Event()
        self.copied[k].record(torch.cuda.current_stream(self.device))
        return x, y
