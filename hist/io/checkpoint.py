"""Checkpoints: written atomically by rank 0 at round boundaries, after a full synchronisation.

No RNG state is stored because none is needed: plans, data order and augmentation are all
functions of (seed, rank, round/step), so resuming at round r redraws exactly what the
uninterrupted run would have drawn.

A checkpoint holds only tensors and plain types and is read with `weights_only=True`, so a
crafted file cannot run code; anything else in it is refused with one line.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from ..errors import HistError, write_failure_cause

# What every hist checkpoint holds.
REQUIRED_KEYS = ("model", "round", "wall_s", "identity")


def save(path: Path, state: dict) -> None:
    """Write to a temporary name, then rename: a reader sees the old checkpoint or the new one,
    never half of one. On failure the temporary file is removed and the old one stays."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = write_failure_cause(path, e)
        raise HistError(
            f"cannot write the checkpoint {path}: {cause}; the previous checkpoint is "
            f"unchanged; free space or choose a writable --checkpoint, then --resume"
        )


def load(path: Path, identity: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HistError(
            f"checkpoint {path} holds something other than tensors and plain values "
            f"({first[:120]}); it was not written by hist-train: delete it or pass another "
            f"--checkpoint"
        )
    except Exception as e:  # truncated zip, not a zip, wrong magic: torch raises many types
        raise HistError(
            f"checkpoint {path} cannot be read ({type(e).__name__}); it is damaged or "
            f"truncated: delete it to start afresh"
        )
    if (
        not isinstance(state, dict)
        or any(k not in state for k in REQUIRED_KEYS)
        or not isinstance(state["identity"], dict)
    ):
        raise HistError(
            f"checkpoint {path} is not a hist-train checkpoint (no model/round/identity); "
            f"pass the file hist-train wrote, or delete it to start afresh"
        )
    if not isinstance(state.get("hist"), dict):  # the training state of hist.IST's session
        raise HistError(
            f"checkpoint {path} was written by a hist-train older than its rebuild on hist.IST's "
            f"session (no training state under 'hist'); finish that run with the hist that wrote it, "
            f"or delete the checkpoint to start afresh"
        )
    for key in identity:  # the caller's: the options its config declares part of a run's identity
        if state["identity"].get(key) != identity.get(key):
            raise HistError(
                f"checkpoint {path} was written with {key}={state['identity'].get(key)!r}, "
                f"this run has {key}={identity.get(key)!r}; resume with the same options"
            )
    return state
