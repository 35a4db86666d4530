"""Checkpoints: written atomically by rank 0 at round boundaries, after a full synchronisation.

No RNG state is stored because none is needed: plans, data order and augmentation are all
functions of (seed, rank, round/step), so resuming at round r redraws exactly what the
uninterrupted run would have drawn.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import HistError

# Keys that must match between a checkpoint and the run that resumes from it.
IDENTITY_KEYS = ("dataset", "arch", "width", "method", "subnets", "min_depth", "aggregate",
                 "local_iters", "batch_size", "seed", "world_size", "synthetic_size",
                 "shared_precision")


def save(path: Path, state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a reader sees the old checkpoint or the new one, never half of one


def load(path: Path, identity: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise HistError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to start afresh")
    for key in IDENTITY_KEYS:
        if state["identity"].get(key) != identity.get(key):
            raise HistError(f"checkpoint {path} was written with {key}={state['identity'].get(key)!r}, "
                            f"this run has {key}={identity.get(key)!r}; resume with the same options")
    return state
