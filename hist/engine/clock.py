"""Per-phase timings of a round (data, compute, sync) that never stall the GPU.

On the CPU a lap reads the wall clock. On a GPU a lap records a CUDA event on the current
stream and the round's phases are read once at its end, after one synchronisation, instead of
a `torch.cuda.synchronize()` after every step.
"""

from __future__ import annotations

import time

import torch


class PhaseClock:
    """Attributes the time since the previous lap to a named phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._marks: list[tuple[str, object]] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream())  # the rank's own GPU (set_device at launch)
            return event
        return time.perf_counter()

    def start(self) -> None:
        """Begin a round: the next lap counts from here."""
        self.totals = {}
        self._marks = [("", self._now())]

    def lap(self, phase: str) -> None:
        self._marks.append((phase, self._now()))

    def read(self) -> dict[str, float]:
        """Seconds per phase since `start` (one synchronisation on a GPU)."""
        if self.cuda:
            self._marks[-1][1].synchronize()
        for (_, a), (phase, b) in zip(self._marks, self._marks[1:]):
            seconds = a.elapsed_time(b) / 1000 if self.cuda else b - a
            self.totals[phase] = self.totals.get(phase, 0.0) + seconds
        self._marks = self._marks[-1:]
        return dict(self.totals)
