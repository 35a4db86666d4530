"""The subnetwork plan: which partitioned blocks each subnetwork trains in a round.

A plan is a pure function of (seed, round, number of blocks, subnets, minimum depth), so every
rank computes the same plan with no communication; `Plan.digest` lets the ranks check that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    round: int
    n_blocks: int
    # blocks[s]: sorted indices (into layer3[1:]) that subnetwork s trains this round.
    blocks: tuple[tuple[int, ...], ...]
    # owner[b]: the subnetwork whose values `--aggregate copy` keeps for block b.
    owner: tuple[int, ...]

    @property
    def subnets(self) -> int:
        return len(self.blocks)

    def holders(self, block: int) -> tuple[int, ...]:
        """Subnetworks that train `block` this round (more than one only with a minimum depth)."""
        return tuple(s for s, bs in enumerate(self.blocks) if block in bs)

    def depth(self) -> int:
        """Blocks per subnetwork (the largest, when the split is uneven)."""
        return max(len(b) for b in self.blocks)

    def keep_fraction(self) -> float:
        """The probability that a block is in the network a training image passes through: the
        test-time residual scale, as in stochastic depth.

        Every subnetwork trains on as many images, and the permutation puts every block in group s
        with probability len(blocks[s]) / n_blocks, so the probability is the mean of those over the
        groups. Without overlap it is 1/S whatever the counts (the block counts sum to n_blocks):
        uneven counts (`--balance speed`) move depth between subnetworks, not the chance of a block.
        """
        return sum(len(b) for b in self.blocks) / (self.subnets * self.n_blocks)

    @property
    def digest(self) -> int:
        """A 63-bit hash of the plan, for a cheap cross-rank consistency check."""
        text = repr((self.round, self.n_blocks, self.blocks, self.owner)).encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def validate(n_blocks: int, subnets: int, min_depth: int) -> None:
    """Raise ValueError with a user-facing message if no plan can be drawn."""
    if subnets < 1:
        raise ValueError(f"subnetworks must be at least 1, got {subnets}")
    if subnets > n_blocks:
        raise ValueError(f"{subnets} subnetworks are more than the {n_blocks} partitionable blocks of layer3")
    if min_depth < 0 or min_depth > n_blocks:
        raise ValueError(f"minimum depth {min_depth} must be between 0 and the {n_blocks} partitionable blocks")


def even_counts(n_blocks: int, subnets: int) -> tuple[int, ...]:
    """Blocks per subnetwork of an even split: equal, the first n_blocks % subnets one larger."""
    return tuple(len(g) for g in np.array_split(np.arange(n_blocks), subnets))


def make_plan(seed: int, round_index: int, n_blocks: int, subnets: int, min_depth: int = 0, counts=None) -> Plan:
    """Split blocks 0..n_blocks-1 into `subnets` random groups, of equal size (+-1) or of the given `counts`.

    The permutation is uniform, so whatever the counts every block is equally likely to land in
    every group. With `min_depth`, a subnetwork smaller than that gets extra blocks drawn at
    random from the other groups, so a block may then belong to several subnetworks (and is averaged).
    """
    validate(n_blocks, subnets, min_depth)
    counts = even_counts(n_blocks, subnets) if counts is None else tuple(int(c) for c in counts)
    if len(counts) != subnets or sum(counts) != n_blocks or min(counts) < 1:
        raise ValueError(f"block counts {counts} must be {subnets} counts of at least 1 summing to {n_blocks}")
    rng = np.random.default_rng([seed, round_index, 0x1517])
    perm = rng.permutation(n_blocks)
    groups = [set(g.tolist()) for g in np.split(perm, np.cumsum(counts)[:-1])]
    owner = [0] * n_blocks
    for s, g in enumerate(groups):
        for b in g:
            owner[b] = s
    for g in groups:
        missing = min_depth - len(g)
        if missing > 0:
            others = np.array(sorted(set(range(n_blocks)) - g))
            g.update(rng.choice(others, size=missing, replace=False).tolist())
    return Plan(round_index, n_blocks, tuple(tuple(sorted(g)) for g in groups), tuple(owner))
