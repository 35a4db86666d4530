"""Long waits before training say what they do: listing a large image folder, a download.
At most one line every few seconds on standard error, with what is done of how much, the
rate and an ETA; silent on ranks other than 0 (the caller says which) and for short waits."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Meter:
    """`what`: done/total `unit` (pct), rate, ETA; `scale` divides the counts for display."""

    # A process-wide switch: hist-train turns it off on every rank but 0 before loading data.
    enabled = True

    def __init__(self, what: str, total: float, unit: str, every_s: float = 5.0, scale: float = 1.0, stream=None):
        self.what, self.total, self.unit, self.every_s, self.scale = what, total, unit, every_s, scale
        self.stream = stream or sys.stderr
        self.done = 0.0
        self.start = self.last = time.monotonic()
        self.said = False

    def advance(self, n: float = 1, **figures) -> None:
        self.done += n
        now = time.monotonic()
        if Meter.enabled and now - self.last >= self.every_s:
            self.last, self.said = now, True
            self.stream.write(self.line(now, figures) + "\n")
            self.stream.flush()

    def line(self, now: float, figures: dict) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        extra = "".join(f", {v} {k}" for k, v in figures.items())
        text = f"{self.what}: {self.done / self.scale:.1f}/{self.total / self.scale:.1f} {self.unit}"
        if self.total > 0:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text += f" ({100 * self.done / self.total:.0f}%){extra}, {rate / self.scale:.1f} {self.unit}/s, ETA {_clock(eta)}"
        return text

    def finish(self) -> None:
        """A closing line, only where progress lines were written (a long wait)."""
        if Meter.enabled and self.said:
            self.stream.write(f"{self.what}: done in {_clock(time.monotonic() - self.start)}\n")
            self.stream.flush()
