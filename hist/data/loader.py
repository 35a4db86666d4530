"""On-device batches: a whole split on the training device, sharded per rank each epoch,
augmented (crop and flip) and normalised in one batched operation, so the training loop never
runs per-image Python."""

from __future__ import annotations

import numpy as np
import torch

from .order import calibration_order, epoch_shard, images_per_rank
from .sources import STATS, UNFLIPPED, Split


class DeviceLoader:
    """A whole split on the device; each rank's images per epoch as `epoch_shard` draws them.

    Under `shard`, the per-epoch permutation (identical on all ranks) is cut into `world`
    disjoint shards of floor(N / world) images; the remainder (< world images) sits out that
    epoch. Under `full`, every rank passes all N in its own order. Each rank's images give
    floor(images / batch) full batches; the last partial batch is dropped, so every step of
    every rank has the same shape.
    """

    def __init__(
        self,
        split: Split,
        dataset: str,
        batch_size: int,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world: int = 1,
        augment: bool = True,
        data_split: str = "shard",
    ):
        self.images = torch.from_numpy(np.ascontiguousarray(split.images)).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        mean, std = STATS[dataset]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world, self.data_split = rank, world, data_split
        self.augment = augment
        self.memory_format = torch.contiguous_format  # torch.channels_last for NHWC models
        self.flip = dataset not in UNFLIPPED
        self.shard_size = images_per_rank(len(self.labels), world, data_split)
        self.steps_per_epoch = self.shard_size // batch_size  # 0 when the batch exceeds the shard
        self._epoch, self._shard = -1, None

    def __len__(self) -> int:
        return len(self.labels)

    def shard(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._shard = epoch_shard(len(self.labels), self.seed, epoch, self.rank, self.world, self.data_split).to(
                self.device
            )
            self._epoch = epoch
        return self._shard

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `step` of this rank's stream (epochs follow one another), augmented and normalised."""
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.shard(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        x = self.images[idx]
        if self.augment:
            g = torch.Generator(device=self.device).manual_seed((self.seed * 7919 + self.rank) * 1_000_003 + step)
            x = augment_batch(x, g, self.flip)
        return self.normalise(x), self.labels[idx]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float().div_(255) - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def calibration_batches(self, n_batches: int, first: int = 0):
        """Unaugmented batches `first`, `first` + 1, ... of a fixed permutation of the whole split
        (wrapping around), the same on every rank for the same `first`."""
        order = calibration_order(len(self.labels), self.seed).to(self.device)
        count = len(order) // self.batch_size
        for i in range(first, first + min(n_batches, count)):
            idx = order[(i % count) * self.batch_size : (i % count + 1) * self.batch_size]
            yield self.normalise(self.images[idx]), self.labels[idx]

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """Contiguous slice `rank` of the whole split, unaugmented, in batches."""
        n = len(self.labels)
        lo, hi = n * rank // world, n * (rank + 1) // world
        for s in range(lo, hi, batch_size):
            e = min(s + batch_size, hi)
            yield self.normalise(self.images[s:e]), self.labels[s:e]


def augment_batch(x: torch.Tensor, g: torch.Generator, flip: bool, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and (optionally) horizontal flip, batched on x's device."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n,1,h,1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n,1,1,w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    if flip:
        mirror = torch.rand(n, generator=g, device=x.device) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out
