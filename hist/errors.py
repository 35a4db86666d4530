"""User-facing errors: one line saying what is wrong, where, and what to do."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class HistError(Exception):
    """An error caused by input or environment, reported without a traceback."""


class BlockError(HistError, ValueError):
    """hist.IST's blocks cannot work as given (none, listed twice, nested, outside the model, a
    shape that changes, more subnetworks than blocks): one line naming the module."""


class OptionError(HistError, ValueError):
    """A keyword argument of hist.IST or hist.LocalSGD that cannot work: one line naming it."""


class ArgumentTypeError(HistError, TypeError):
    """An argument of hist.IST or hist.LocalSGD of the wrong kind (a model that is not a module,
    an optimizer whose state hist cannot aggregate): one line naming it."""


class CollectiveError(HistError):
    """Raised on every rank at once after the ranks agreed on it (a diverged loss, a failed
    write, a clashing run): rank 0 prints the line, the other ranks exit quietly."""


def write_failure_cause(path: Path, e: BaseException) -> str:
    """Why a write under `path` failed, in the words a user searches for ('no space left on
    device', 'read-only file system'). Libraries that hide the OSError (torch, HDF5) are
    second-guessed by asking the file system."""
    code = getattr(e, "errno", None)
    if isinstance(code, int) and code:
        return os.strerror(code).lower()
    try:
        st = os.statvfs(Path(path).parent)
        if st.f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS).lower()
        if st.f_bavail * st.f_frsize < 1 << 20:
            return os.strerror(errno.ENOSPC).lower()
    except OSError as inner:
        return os.strerror(inner.errno).lower() if inner.errno else str(inner)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return first[:200]
