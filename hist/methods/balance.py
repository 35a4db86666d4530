"""`--balance speed`: the block counts of the next plan, from every subnetwork's measured speed.

Each round every rank's data and compute seconds ride on the round's one flag allreduce (the
loop's), so every rank holds the same figures and computes the same counts: nothing is sent for
the plan. A moving average over rounds and a one-block limit per subnetwork and round keep
noise from reshuffling the depth; the state goes in the checkpoint, so resume stays exact.
"""

from __future__ import annotations

import numpy as np

from ..models import conv_flops, even_counts, next_counts, target_counts

# Weight of the past in the moving average of each subnetwork's speed, per round.
SPEED_MEMORY = 0.7


class SpeedBalancer:
    """The counts of the next round's plan; `observe` takes each round's agreed per-rank seconds."""

    def __init__(self, model, n_blocks: int, subnets: int, ranks_per_subnet: int):
        self.n_blocks, self.subnets, self.group = n_blocks, subnets, ranks_per_subnet
        # Cost units of a step: the shared layers, and one partitioned block (all alike in layer3[1:]).
        self.shared_cost = conv_flops(model, [])
        self.block_cost = (conv_flops(model, range(n_blocks)) - self.shared_cost) / n_blocks
        self.counts = even_counts(n_blocks, subnets)
        self.rate: np.ndarray | None = None  # moving average: cost units per second, per subnetwork
        self.fixed: np.ndarray | None = None  # moving average: seconds per step not scaled by depth

    def observe(self, blocks: list[int], steps: int, data_s, compute_s) -> None:
        """Fold one round into the averages (`blocks`: what each subnetwork trained), then move the counts."""
        per_step = np.maximum(np.asarray(compute_s, dtype=float) / steps, 1e-9)
        work = self.shared_cost + self.block_cost * np.repeat(np.asarray(blocks, dtype=float), self.group)
        # A subnetwork's ranks average gradients every step: it goes at its slowest rank's pace.
        rate = (work / per_step).reshape(self.subnets, self.group).min(axis=1)
        fixed = (np.asarray(data_s, dtype=float) / steps).reshape(self.subnets, self.group).max(axis=1)
        if self.rate is None:
            self.rate, self.fixed = rate, fixed
        else:
            self.rate = SPEED_MEMORY * self.rate + (1 - SPEED_MEMORY) * rate
            self.fixed = SPEED_MEMORY * self.fixed + (1 - SPEED_MEMORY) * fixed
        target = target_counts(self.n_blocks, self.shared_cost, self.block_cost, self.rate, self.fixed)
        self.counts = next_counts(self.counts, target)

    def state_dict(self) -> dict:
        return {
            "counts": list(self.counts),
            "rate": None if self.rate is None else self.rate.tolist(),
            "fixed": None if self.fixed is None else self.fixed.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.counts = tuple(state["counts"])
        self.rate = None if state["rate"] is None else np.asarray(state["rate"], dtype=float)
        self.fixed = None if state["fixed"] is None else np.asarray(state["fixed"], dtype=float)
