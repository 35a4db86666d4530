"""One run per output: a lock file beside the timing file and the checkpoint.

Two jobs given the same `--out` (or `--checkpoint`) would interleave rounds in one HDF5 file
and overwrite each other's checkpoints. Rank 0 holds an exclusive `flock` on `<file>.lock`
for the whole run; the kernel releases it when the process ends, however it ends, so a
killed or requeued job never leaves a stale lock (the empty lock file itself stays). A file
system without `flock` (Lustre mounted `noflock`, some NFS) gets a warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from ..errors import HistError

# What flock raises where the file system has no locks: the run goes on, unguarded.
NO_LOCKS_HERE = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def held_by_a_run(path) -> bool:
    """Whether a live run holds `path` now. Asked only after a read of the file failed (a reader
    may have met an append), so a starting run can hardly meet this brief shared lock."""
    lock = _lock_path(Path(path))
    try:
        with open(lock, "r") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when f closes
    except BlockingIOError:
        return True
    except OSError:  # no lock file, or no flock here: no run of ours writes it
        return False
    return False


class RunLock:
    def __init__(self, paths):
        self._files = []
        try:
            for path in dict.fromkeys(Path(p) for p in paths):  # each once, in order
                self._files.append(self._take(path))
        except BaseException:
            self.release()
            raise

    @staticmethod
    def _take(path: Path):
        lock = _lock_path(path)
        lock.touch(exist_ok=True)
        # Held read-only: a lock must not keep its file system from going read-only under us
        # (the run then ends with one line, as on a full disk, instead of holding the mount).
        f = open(lock, "r")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except ValueError:
                holder = {}
            f.close()
            who = (
                f" (pid {holder.get('pid')} on {holder.get('host')}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))})"
                if holder
                else ""
            )
            raise HistError(
                f"{path} is in use by another run{who}; wait for it to end, or give this run "
                f"another --out (and --checkpoint)"
            )
        except OSError as e:
            if e.errno not in NO_LOCKS_HERE:
                raise
            warnings.warn(f"{path.parent} has no file locks ({e.strerror}): nothing stops a second run on {path}")
            return f
        lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        return f

    def release(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
