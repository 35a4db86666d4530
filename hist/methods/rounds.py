"""How long a round lasts under each `--round-schedule` (hist.engine.rounds has the schedules
themselves), from what the round's start knows: a pure function, so hist-train's schedule and
hist.IST (the optimizer's rate) read the same rule."""

from __future__ import annotations

import math


def length_of_round(
    schedule: str, step: int, local_iters: int, lr: float | None = None, qsr_alpha: float = 0.1, switch: int = 0
) -> int:
    """Steps of the round that starts at `step` under `schedule`, from what the round's start
    knows: its learning rate (qsr) and post-local's switch step. Pure: hist-train's schedule
    below and hist.IST (the optimizer's rate) both read it."""
    if schedule == "post-local":
        return 1 if step < switch else local_iters
    if schedule == "qsr":
        return max(local_iters, math.floor((qsr_alpha / lr) ** 2 + 1e-9))  # not 399 for 0.2/0.01
    return local_iters
