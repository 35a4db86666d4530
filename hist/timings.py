"""The timing file: one HDF5 file per run, written by rank 0, readable while the run goes on.

The file is opened, appended to and closed every round, so a killed run leaves a readable
file and a reader never sees half a round. The layout (`SCHEMA_VERSION`) is documented in
the README; `read_run` is the one reader the report uses.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import HistError

SCHEMA = "hist-timings"
SCHEMA_VERSION = 1
# Per-rank, per-round columns: name -> (dtype, unit, description)
RANK_COLUMNS = {
    "compute_s": ("f8", "s", "local training steps (forward, backward, optimizer), data excluded"),
    "data_s": ("f8", "s", "waiting for batches (indexing, augmentation)"),
    "sync_s": ("f8", "s", "synchronisation: gradient averaging, aggregation, consistency checks"),
    "bytes_sent": ("i8", "B", "bytes this rank sent"),
    "bytes_received": ("i8", "B", "bytes this rank received"),
    "loss": ("f4", "1", "mean training loss over the round's steps"),
}
ROUND_COLUMNS = {
    "round": ("i8", "1", "round index (0-based)"),
    "steps": ("i8", "1", "local steps in the round"),
    "epoch": ("f8", "epoch", "epochs completed at the end of the round"),
    "wall_s": ("f8", "s", "wall time since the start of training at the end of the round"),
}
EVAL_COLUMNS = {
    "round": ("i8", "1", "round after which the global model was evaluated"),
    "epoch": ("f8", "epoch", "epochs completed"),
    "wall_s": ("f8", "s", "wall time since the start of training"),
    "test_loss": ("f8", "1", "mean cross-entropy on the whole test split"),
    "test_accuracy": ("f8", "%", "top-1 accuracy on the whole test split"),
}


def _create(group: h5py.Group, name: str, dtype: str, width: int | None, unit: str, doc: str):
    shape, maxshape = ((0, width), (None, width)) if width else ((0,), (None,))
    ds = group.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype, chunks=True)
    ds.attrs["unit"], ds.attrs["description"] = unit, doc


def _append(ds: h5py.Dataset, row) -> None:
    ds.resize(ds.shape[0] + 1, axis=0)
    ds[-1] = row


class TimingWriter:
    """Rank 0's writer. `start_round` > 0 continues a resumed run, dropping rows past it."""

    def __init__(self, path: Path, meta: dict, world_size: int, start_round: int = 0):
        self.path = Path(path)
        self.start = time.time()
        if start_round and self.path.is_file():
            with self._open("a") as f:
                _check_schema(f, self.path)
                self._truncate(f, start_round)
                f.attrs["status"] = "running"
                f.attrs["resumed_at_round"] = np.append(f.attrs.get("resumed_at_round", []), start_round)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"], f.attrs["schema_version"] = SCHEMA, SCHEMA_VERSION
            for k, v in meta.items():
                f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v)
            f.attrs["status"] = "running"
            f.attrs["started_unix"] = self.start
            rounds, evals = f.create_group("rounds"), f.create_group("evals")
            for name, (dtype, unit, doc) in RANK_COLUMNS.items():
                _create(rounds, name, dtype, world_size, unit, doc)
            for name, (dtype, unit, doc) in ROUND_COLUMNS.items():
                _create(rounds, name, dtype, None, unit, doc)
            for name, (dtype, unit, doc) in EVAL_COLUMNS.items():
                _create(evals, name, dtype, None, unit, doc)
        tmp.replace(self.path)

    def _open(self, mode: str) -> h5py.File:
        return h5py.File(self.path, mode)

    @staticmethod
    def _truncate(f: h5py.File, start_round: int) -> None:
        keep = int(np.searchsorted(f["rounds/round"][:], start_round))
        for name in list(RANK_COLUMNS) + list(ROUND_COLUMNS):
            f["rounds"][name].resize(keep, axis=0)
        keep_e = int(np.searchsorted(f["evals/round"][:], start_round))
        for name in EVAL_COLUMNS:
            f["evals"][name].resize(keep_e, axis=0)

    def add_round(self, round_index: int, steps: int, epoch: float, wall_s: float,
                  per_rank: dict[str, list]) -> None:
        with self._open("a") as f:
            r = f["rounds"]
            for name in RANK_COLUMNS:
                _append(r[name], np.asarray(per_rank[name]))
            for name, value in (("round", round_index), ("steps", steps), ("epoch", epoch), ("wall_s", wall_s)):
                _append(r[name], value)

    def add_eval(self, round_index: int, epoch: float, wall_s: float, loss: float, accuracy: float) -> None:
        with self._open("a") as f:
            e = f["evals"]
            for name, value in (("round", round_index), ("epoch", epoch), ("wall_s", wall_s),
                                ("test_loss", loss), ("test_accuracy", accuracy)):
                _append(e[name], value)

    def finish(self, status: str, total_wall_s: float) -> None:
        with self._open("a") as f:
            f.attrs["status"] = status
            f.attrs["total_wall_s"] = total_wall_s


def _check_schema(f: h5py.File, path: Path) -> None:
    schema, version = f.attrs.get("schema"), f.attrs.get("schema_version")
    if schema != SCHEMA:
        raise HistError(f"{path} is an HDF5 file but not a hist timing file (no schema={SCHEMA!r} "
                        f"attribute); pass the files hist-train wrote")
    if int(version) != SCHEMA_VERSION:
        raise HistError(f"{path} has timing schema version {version}; this hist reads version "
                        f"{SCHEMA_VERSION}; use the hist version that wrote it")


@dataclass
class Run:
    """One run's file, read into memory."""
    path: Path
    attrs: dict
    rounds: dict[str, np.ndarray]
    evals: dict[str, np.ndarray]

    @property
    def config(self) -> dict:
        return json.loads(self.attrs.get("config", "{}"))


def read_run(path) -> Run:
    path = Path(path)
    if not path.exists():
        raise HistError(f"{path} does not exist; pass a timing file or a folder of them")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise HistError(f"{path} is not a readable HDF5 file ({e}); pass a file hist-train wrote")
    with f:
        _check_schema(f, path)
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        rounds = {k: f["rounds"][k][:] for k in f["rounds"]}
        evals = {k: f["evals"][k][:] for k in f["evals"]}
    # A run killed mid-write may leave columns one row apart: keep the complete rows.
    n = min(len(v) for v in rounds.values())
    rounds = {k: v[:n] for k, v in rounds.items()}
    m = min(len(v) for v in evals.values())
    evals = {k: v[:m] for k, v in evals.items()}
    return Run(path, attrs, rounds, evals)
