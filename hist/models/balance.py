"""Block counts that follow each subnetwork's measured speed (`--balance speed`).

A subnetwork's step costs a fixed part (data, the shared layers) plus a part proportional to its
layer-3 blocks. Given each subnetwork's measured rate and fixed seconds per step, the counts
below make every subnetwork's step take the same time, so no rank waits at the round's end.
Pure functions of the agreed figures: every rank computes the same counts without sending them.
"""

from __future__ import annotations

import numpy as np

# A count moves only when it is more than this many blocks beyond half a block from its target,
# so a target hovering near a rounding boundary does not move a block back and forth.
HYSTERESIS_BLOCKS = 0.25


def target_counts(
    n_blocks: int, shared_cost: float, block_cost: float, rates, fixed_s, min_blocks: int = 1
) -> np.ndarray:
    """Real-valued blocks per subnetwork that equalise the step time d_s + (shared + k_s * block) / v_s.

    `rates[s]`: cost units (e.g. multiply-adds) per second of subnetwork s's compute; `fixed_s[s]`:
    its seconds per step that do not depend on its depth (waiting for data). The counts sum to
    `n_blocks` and none is below `min_blocks` (a subnetwork held there gets no more work).
    """
    v, d = np.asarray(rates, dtype=float), np.asarray(fixed_s, dtype=float)
    counts = np.zeros(len(v))
    free = np.ones(len(v), dtype=bool)
    while True:
        left = n_blocks - min_blocks * np.count_nonzero(~free)
        # sum over free s of ((T - d_s) v_s - shared) / block = left, solved for the common step time T
        step_time = (left * block_cost + np.sum(free * (shared_cost + d * v))) / np.sum(v[free])
        counts[free] = ((step_time - d[free]) * v[free] - shared_cost) / block_cost
        counts[~free] = min_blocks
        low = free & (counts < min_blocks)
        if not low.any():
            return counts
        free &= ~low


def next_counts(current, target, margin: float = HYSTERESIS_BLOCKS) -> tuple[int, ...]:
    """One round's move from the `current` counts toward the real `target`: a subnetwork gains or
    loses at most one block, a block moves only from one more than 0.5 + margin over its target to
    one as far under it, and the total stays the same."""
    counts = [int(c) for c in current]
    target = np.asarray(target, dtype=float)
    moved: set[int] = set()
    while True:
        over = [(counts[s] - target[s], s) for s in range(len(counts)) if s not in moved]
        under = [(target[s] - counts[s], s) for s in range(len(counts)) if s not in moved]
        if not over:
            return tuple(counts)
        (excess, giver), (deficit, taker) = max(over), max(under)
        if giver == taker or excess < 0.5 + margin or deficit < 0.5 + margin:
            return tuple(counts)
        counts[giver] -= 1
        counts[taker] += 1
        moved.update((giver, taker))
