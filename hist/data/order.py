"""Which training images each rank passes each epoch, and in what order: the one rule both
loaders (on-device and streaming) follow, so a resumed run redraws the same order, and the
projection counts the same steps per epoch."""

from __future__ import annotations

import torch

# torch's CPU generator keeps 32 bits of a seed. Under `full`, rank r's order is seeded r steps
# of this odd constant (2^32 / golden ratio) away from the shared one: rank 0's order is the
# shared one (so one process is the same run under both splits), and nearby (epoch, rank)
# pairs never meet (tests check 200 epochs x 64 ranks).
RANK_SEED_STEP = 0x9E3779B1


def order_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The generator seed of `epoch`'s order: rank 0's is the one every rank shares under `shard`."""
    return (seed * 1_000_003 + epoch + rank * RANK_SEED_STEP) % 2**32


def ranks_sharing_an_epoch(world: int, split: str = "shard") -> int:
    """How many ranks divide one epoch's images among them: all under shard, none under full."""
    return 1 if split == "full" else world


def images_per_rank(n: int, world: int, split: str = "shard") -> int:
    """How many of the `n` training images one rank passes each epoch (whole ones)."""
    return n // ranks_sharing_an_epoch(world, split)


def epoch_shard(n: int, seed: int, epoch: int, rank: int, world: int, split: str = "shard") -> torch.Tensor:
    """Rank `rank`'s images of `epoch` (CPU indices).

    shard: a permutation seeded alike on every rank, cut into `world` disjoint shards of
    floor(n / world); the remainder sits out the epoch. full: the whole set in an order of this
    rank's own, seeded by (seed, epoch, rank)."""
    if split == "full":
        return torch.randperm(n, generator=torch.Generator().manual_seed(order_seed(seed, epoch, rank)))
    size = images_per_rank(n, world, split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed(seed, epoch)))
    return order[rank * size : (rank + 1) * size]


def calibration_order(n: int, seed: int) -> torch.Tensor:
    """The fixed order BatchNorm calibration batches are taken in, the same on every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 - 1))
