"""Where each round starts: a pure function of the options and the run's length, so every
rank draws the same rounds without sending them and a resumed run continues the same ones.

`--round-schedule`:
- constant: rounds of `--local-iters` steps (ResIST, local SGD).
- post-local: post-local SGD (Lin et al., ICLR 2020): one step a round (an average every step)
  until the learning rate's first drop, at half the run (where the step schedule drops it),
  then `--local-iters`.
- qsr: the quadratic synchronisation rule (Gu et al., ICLR 2024): a round started at
  learning rate lr lasts max(local_iters, floor((alpha / lr)^2)) steps, so rounds lengthen
  as the learning rate falls; alpha is `--qsr-alpha`.
"""

from __future__ import annotations

import math

from ..config import Config
from ..methods.rounds import length_of_round
from .schedule import lr_at

# post-local's switch: the step schedule's first drop, at this fraction of the run
POST_LOCAL_SWITCH = 0.5


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Steps of one rank in the whole run (at least one)."""
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


def round_length(step: int, total: int, steps_per_epoch: int, cfg: Config, peak: float) -> int:
    """Steps of the round that starts at `step`."""
    lr = lr_at(step, total, steps_per_epoch, cfg, peak) if cfg.round_schedule == "qsr" else None
    switch = math.ceil(POST_LOCAL_SWITCH * total)
    return length_of_round(cfg.round_schedule, step, cfg.local_iters, lr, cfg.qsr_alpha, switch)


def round_starts(cfg: Config, steps_per_epoch: int, peak: float) -> list[int]:
    """The first step of every round, then the run's total steps: round r is the steps
    starts[r] .. starts[r + 1] - 1."""
    total = total_steps(cfg, steps_per_epoch)
    starts = [0]
    while starts[-1] < total:
        starts.append(min(total, starts[-1] + round_length(starts[-1], total, steps_per_epoch, cfg, peak)))
    return starts


def rounds_before(starts: list[int], step: float) -> int:
    """How many rounds start before `step` (the rounds of a warm-up that ends there)."""
    return sum(1 for s in starts[:-1] if s < step)
