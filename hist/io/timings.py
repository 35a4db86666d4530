"""The timing file: one HDF5 file per run, written by rank 0, readable while the run goes on.

The file is opened, appended to and closed every round, so a killed run leaves a readable
file and a reader never sees half a round. The layout (`SCHEMA_VERSION`) is documented in
the README; `read_run` is the one reader the report uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import HistError, write_failure_cause
from .runlock import held_by_a_run

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
    "lr": ("f8", "1", "learning rate of the round's last step"),
}
EVAL_COLUMNS = {
    "round": ("i8", "1", "round after which the global model was evaluated"),
    "epoch": ("f8", "epoch", "epochs completed"),
    "wall_s": ("f8", "s", "wall time since the start of training"),
    "test_loss": ("f8", "1", "mean cross-entropy on the whole test split"),
    "test_accuracy": ("f8", "%", "top-1 accuracy on the whole test split"),
    "test_top5": ("f8", "%", "top-5 accuracy on the whole test split (100 with 5 classes or fewer)"),
}
# Columns added after schema version 1's first files: read as NaN where a file lacks them.
LATER_EVAL_COLUMNS = ("test_top5",)
LATER_ROUND_COLUMNS = ("lr",)
# Gradient-noise-scale probes (--noise-every), a group created at the first probe.
NOISE_COLUMNS = {
    "round": ("i8", "1", "round after which the probe ran"),
    "epoch": ("f8", "epoch", "epochs completed"),
    "small_batch": ("i8", "1", "images behind one small gradient (half a rank's batch)"),
    "big_batch": ("i8", "1", "images behind the averaged gradient (every rank's two halves)"),
    "small_sq": ("f8", "1", "|G_small|^2: squared norm of a half-batch gradient, mean over all halves"),
    "big_sq": ("f8", "1", "|G_big|^2: squared norm of the average of all half-batch gradients"),
}
# IST only, per subnetwork: created at the first IST round (earlier warm-up rows: -1, the full model).
BLOCKS_COLUMN = ("blocks", "i4", "1", "partitioned blocks each subnetwork trained in the round (-1: the full model)")


def open_h5(path, mode: str = "r") -> h5py.File:
    """Every open of a timing file, by the writer and by every reader, without HDF5's file lock.

    With the lock, a reader that holds the file open (a notebook, `hist-report` on a live run)
    makes the writer's next append fail, which would end the training run; and file systems
    without flock (some Lustre and NFS mounts) refuse the open outright. One writer per file is
    RunLock's job (`runlock.py`); a reader never sees half a round of its own appends, because
    it trims every column to the shortest (`read_checked`).
    """
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as e:
        if mode != "r" or "locking flag" not in str(e):
            raise
        return h5py.File(path, mode)  # this process holds it open already, locked: share that handle


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
        with self._failing_write(tmp):
            self._create_file(tmp, meta, world_size)
            tmp.replace(self.path)

    def _create_file(self, tmp: Path, meta: dict, world_size: int) -> None:
        with open_h5(tmp, "w") as f:
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

    @contextlib.contextmanager
    def _failing_write(self, tmp: Path | None = None):
        """A failed write (full disk, quota, a file system gone read-only) becomes one line
        naming the file and the cause; a temporary file is not left behind."""
        try:
            yield
        except (OSError, RuntimeError, KeyError) as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise HistError(
                f"cannot write the timing file {self.path}: {write_failure_cause(self.path, e)}; "
                f"the rounds written so far are kept; free space or choose another --out"
            )

    @contextlib.contextmanager
    def _open(self, mode: str):
        with self._failing_write(), open_h5(self.path, mode) as f:
            yield f

    @staticmethod
    def _truncate(f: h5py.File, start_round: int) -> None:
        keep = int(np.searchsorted(f["rounds/round"][:], start_round))
        for name in list(RANK_COLUMNS) + list(ROUND_COLUMNS) + [BLOCKS_COLUMN[0]]:
            if name in f["rounds"]:
                f["rounds"][name].resize(keep, axis=0)
        keep_e = int(np.searchsorted(f["evals/round"][:], start_round))
        for name in EVAL_COLUMNS:
            f["evals"][name].resize(keep_e, axis=0)
        if "noise" in f:
            keep_n = int(np.searchsorted(f["noise/round"][:], start_round))
            for name in NOISE_COLUMNS:
                f["noise"][name].resize(keep_n, axis=0)

    def add_round(
        self,
        round_index: int,
        steps: int,
        epoch: float,
        wall_s: float,
        per_rank: dict[str, list],
        lr: float = float("nan"),
        blocks=None,
    ) -> None:
        with self._open("a") as f:
            r = f["rounds"]
            for name in RANK_COLUMNS:
                _append(r[name], np.asarray(per_rank[name]))
            row = (("round", round_index), ("steps", steps), ("epoch", epoch), ("wall_s", wall_s), ("lr", lr))
            for name, value in row:
                if name in r:  # a resumed file from before a later column keeps its columns
                    _append(r[name], value)
            name, dtype, unit, doc = BLOCKS_COLUMN
            if blocks is not None and name not in r:
                _create(r, name, dtype, len(blocks), unit, doc)
                r[name].resize(len(r["round"]) - 1, axis=0)
                r[name][:] = -1
            if name in r:
                _append(r[name], np.asarray(blocks if blocks is not None else [-1] * r[name].shape[1]))

    def add_eval(
        self, round_index: int, epoch: float, wall_s: float, loss: float, accuracy: float, top5: float
    ) -> None:
        with self._open("a") as f:
            e = f["evals"]
            for name, value in (
                ("round", round_index),
                ("epoch", epoch),
                ("wall_s", wall_s),
                ("test_loss", loss),
                ("test_accuracy", accuracy),
                ("test_top5", top5),
            ):
                _append(e[name], value)

    def add_noise(
        self, round_index: int, epoch: float, small_batch: int, big_batch: int, small_sq: float, big_sq: float
    ) -> None:
        with self._open("a") as f:
            if "noise" not in f:
                group = f.create_group("noise")
                for name, (dtype, unit, doc) in NOISE_COLUMNS.items():
                    _create(group, name, dtype, None, unit, doc)
            row = (round_index, epoch, small_batch, big_batch, small_sq, big_sq)
            for name, value in zip(NOISE_COLUMNS, row):
                _append(f["noise"][name], value)

    def finish(self, status: str, total_wall_s: float) -> None:
        with self._open("a") as f:
            f.attrs["status"] = status
            f.attrs["total_wall_s"] = total_wall_s


def _check_schema(f: h5py.File, path: Path) -> None:
    schema, version = f.attrs.get("schema"), f.attrs.get("schema_version")
    if schema != SCHEMA:
        raise HistError(
            f"{path} is an HDF5 file but not a hist timing file (no schema={SCHEMA!r} "
            f"attribute); pass the files hist-train wrote"
        )
    if int(version) != SCHEMA_VERSION:
        raise HistError(
            f"{path} has timing schema version {version}; this hist reads version "
            f"{SCHEMA_VERSION}; use the hist version that wrote it"
        )


@dataclass
class Run:
    """One run's file, read into memory."""

    path: Path
    attrs: dict
    rounds: dict[str, np.ndarray]
    evals: dict[str, np.ndarray]
    noise: dict[str, np.ndarray] = field(default_factory=dict)  # NOISE_COLUMNS; empty without probes

    @property
    def config(self) -> dict:
        return json.loads(self.attrs.get("config", "{}"))

    @property
    def processor(self) -> str | None:
        """The GPU, else the processor and torch's kernel level, the run ran on (None in files
        from before the record)."""
        versions = json.loads(self.attrs.get("versions", "{}"))
        if versions.get("gpu"):
            return versions["gpu"]
        return f"{versions['cpu']} ({versions['cpu_capability']})" if versions.get("cpu") else None

    @property
    def engine(self) -> str:
        """The engine that ran it: horovod, torch or local (one process); files from before the
        record: horovod beyond one process."""
        return str(self.attrs.get("engine") or ("local" if int(self.attrs.get("world_size", 1)) == 1 else "horovod"))

    @property
    def traffic(self) -> str | None:
        """What each kind of its traffic sent, in words (None: one process, or a file from before
        the record)."""
        kinds = json.loads(self.attrs.get("traffic") or "{}")
        return "; ".join(f"{k} {v}" for k, v in kinds.items()) or None

    @property
    def data_split(self) -> str:
        """The run's protocol (hist-train --data-split); files from before the option: shard."""
        return str(self.attrs.get("data_split") or self.config.get("data_split") or "shard")


# Attributes the report needs, with the type it needs them in.
REQUIRED_ATTRS = {"method": str, "dataset": str, "arch": str, "world_size": int}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def read_checked(path: Path) -> Run:
    """Read and check one file; anything wrong with it is a HistError naming the file."""
    try:
        f = open_h5(path)
    except OSError as e:
        raise HistError(f"{path} is not a readable HDF5 file ({_first_line(e)}); pass a file hist-train wrote")
    try:
        with f:
            _check_schema(f, path)
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            rounds = {
                k: f["rounds"][k][:] if k in f["rounds"] or k not in LATER_ROUND_COLUMNS else None
                for k in (*RANK_COLUMNS, *ROUND_COLUMNS)
            }
            n_rounds = len(rounds["round"])
            rounds = {k: np.full(n_rounds, np.nan) if v is None else v for k, v in rounds.items()}
            if BLOCKS_COLUMN[0] in f["rounds"]:
                rounds[BLOCKS_COLUMN[0]] = f["rounds"][BLOCKS_COLUMN[0]][:]
            evals = {
                k: f["evals"][k][:] if k in f["evals"] or k not in LATER_EVAL_COLUMNS else None for k in EVAL_COLUMNS
            }
            n_evals = len(evals["round"])
            evals = {k: np.full(n_evals, np.nan) if v is None else v for k, v in evals.items()}
            noise = {k: f["noise"][k][:] for k in NOISE_COLUMNS} if "noise" in f else {}
        for name, kind in REQUIRED_ATTRS.items():
            attrs[name] = kind(attrs[name])
        attrs["width"] = float(attrs.get("width", 1.0))
        world = attrs["world_size"]
        if (
            world < 1
            or any(rounds[k].ndim != 2 or rounds[k].shape[1] != world for k in RANK_COLUMNS)
            or any(v.ndim != 1 for v in (*evals.values(), *(rounds[k] for k in ROUND_COLUMNS)))
        ):
            raise ValueError(f"columns do not match world_size {world}")
        if not isinstance(json.loads(attrs.get("config", "{}")), dict):
            raise ValueError("the config attribute is not a JSON object")
    except HistError:
        raise
    except Exception as e:  # a flipped bit or a cut can surface as almost any error
        raise HistError(
            f"{path} is damaged ({type(e).__name__}: {_first_line(e)}); it was cut short "
            f"or altered: leave it out or run it again"
        )
    # A run killed mid-write may leave columns one row apart: keep the complete rows.
    n = min(len(v) for v in rounds.values())
    rounds = {k: v[:n] for k, v in rounds.items()}
    m = min(len(v) for v in evals.values())
    evals = {k: v[:m] for k, v in evals.items()}
    if noise:
        k = min(len(v) for v in noise.values())
        noise = {name: v[:k] for name, v in noise.items()}
    return Run(path, attrs, rounds, evals, noise)


def read_run(path, timeout_s: float = 60.0) -> Run:
    """Read one timing file, isolated (see `isolated`)."""
    return isolated(read_checked, path, timeout_s)


# A read that meets the live writer's append (open_h5 takes no lock) is tried again while the
# run holds the file, for this long: a writer descheduled mid-append on a loaded node keeps the
# file torn for seconds, and a fixed pause could fall in step with the writer's rounds.
LIVE_READ_PATIENCE_S = 30.0
LIVE_READ_PAUSE_S = (0.05, 0.25)


class _Hung(HistError):
    """The reader ran out of time: the file is damaged, and another try would hang as long."""


def isolated(reader, path, timeout_s: float = 60.0):
    """`reader(path)` in a forked child: a damaged file that crashes or hangs the HDF5 library
    ends the child, never the caller, and costs at most `timeout_s`. HistError passes through.
    A failed read of a file a live run holds (RunLock) met an append mid-way, and is tried again
    (once more if the run let go of it meanwhile)."""
    give_up, last_try = time.monotonic() + LIVE_READ_PATIENCE_S, False
    while True:
        try:
            return _isolated_once(reader, path, timeout_s)
        except _Hung:
            raise
        except HistError:
            if last_try or time.monotonic() > give_up:
                raise
            # Not held now: damaged, or a run let go of it since the read began (its last
            # append, then the release), so whole: one more read tells which.
            last_try = not held_by_a_run(path)
            if not last_try:
                time.sleep(random.uniform(*LIVE_READ_PAUSE_S))


def _isolated_once(reader, path, timeout_s: float):
    path = Path(path)
    if not path.exists():
        raise HistError(f"{path} does not exist; pass a timing file or a folder of them")
    if not hasattr(os, "fork"):
        return reader(path)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read, send the result, leave without running any cleanup
        os.close(rfd)
        try:
            try:
                payload = pickle.dumps(("ok", reader(path)))
            except HistError as e:
                payload = pickle.dumps(("error", str(e)))
            except BaseException as e:
                payload = pickle.dumps(("error", f"{path} could not be read ({type(e).__name__})"))
            with os.fdopen(wfd, "wb") as out:
                out.write(payload)
        finally:
            os._exit(0)
    os.close(wfd)
    data, deadline = bytearray(), time.monotonic() + timeout_s
    with os.fdopen(rfd, "rb", buffering=0) as inp:
        while True:
            ready, _, _ = select.select([inp], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise _Hung(f"{path} could not be read within {timeout_s:.0f} s; it is damaged: leave it out")
            chunk = inp.read(1 << 20)
            if not chunk:
                break
            data += chunk
    _, status = os.waitpid(pid, 0)
    if not data:
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        raise HistError(f"{path} is damaged: reading it crashed the HDF5 library ({how}); leave it out")
    kind, value = pickle.loads(bytes(data))  # from our own child, never from the file
    if kind == "error":
        raise HistError(value)
    return value
