"""The learning rate of every step: peak (scaled with the process count if asked), warm-up,
then the step or cosine schedule. A pure function of the step, so resume needs no state."""

from __future__ import annotations

import math

from ..config import Config


def lr_scaling(cfg: Config) -> str:
    """What `--lr-scaling auto` resolves to: linear when ranks share an epoch's data (N ranks
    take N times the images per round, Goyal et al.), none when every rank passes all of it."""
    if cfg.lr_scaling != "auto":
        return cfg.lr_scaling
    return "none" if cfg.data_split == "full" else "linear"


def peak_lr(cfg: Config, world_size: int) -> float:
    """The peak learning rate: `--lr`, times the process count under linear scaling."""
    return cfg.lr * (world_size if lr_scaling(cfg) == "linear" else 1)


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: Config, peak: float | None = None) -> float:
    peak = cfg.lr if peak is None else peak
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return peak * (0.1 + 0.9 * step / warm)
    frac = step / max(1, total_steps)
    if cfg.schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return peak * (0.01 if frac >= 0.75 else 0.1 if frac >= 0.5 else 1.0)
