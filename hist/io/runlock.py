"""One run per output: a lock file beside the timing file and the checkpoint.

Two jobs given the same `--out` (or `--checkpoint`) would interleave rounds in one HDF5 file
and overwrite each other's checkpoints. Rank 0 holds an exclusive `flock` on `<file>.lock`
for the whole run; the kernel releases it when the process ends, however it ends, so a
killed or requeued job never leaves a stale lock (the empty lock file itself stays).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import HistError


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
        lock = path.with_name(path.name + ".lock")
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
        lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        return f

    def release(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
