"""Watching a run from its log: rank 0's progress between evaluations.

At most one line every `--log-every` seconds (0: none): epoch and round out of the total,
train loss, learning rate, global images/s with the data, compute and sync shares of the
interval, elapsed time and ETA. Where standard output is a terminal, one bar updated in place
on standard error replaces the lines (evaluation lines are written above it); in Slurm logs
and pipes the output stays plain lines. (tqdm was tried first; on a terminal that reports no
size, as a pseudo-terminal may, it printed nothing. The bar is one line of code away from
plain text, so it is written here.)
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field


def clock(seconds: float) -> str:
    """1h02m03s / 4m05s / 6s."""
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Interval:
    """What the ranks did since the last line: images (all ranks) and phase seconds (summed
    over ranks, so the shares are the mean rank's)."""

    images: int = 0
    phases: dict = field(default_factory=lambda: {"data": 0.0, "compute": 0.0, "sync": 0.0})
    since: float = 0.0


class Progress:
    """Rank 0's progress lines (or bar). `update` once a round; `write` for other lines."""

    def __init__(self, every_s: float, n_rounds: int, total_epochs: float, stream=None, bar: bool = False):
        self.every_s, self.n_rounds, self.total_epochs = every_s, n_rounds, total_epochs
        self.stream = stream or sys.stdout
        self.bar = None
        if every_s > 0 and bar:
            self.bar = Bar(sys.stderr, n_rounds)
        self.start_wall = self.start_round = None
        self.last_line = time.monotonic()
        self.interval = Interval()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        # One write a line: print() writes the text and its newline apart, and mpirun's
        # --tag-output may tag the lone newline as a fragment of its own.
        self.stream.write(line + "\n")
        self.stream.flush()
        if self.bar is not None:
            self.bar.draw()

    def update(
        self,
        round_done: int,
        epoch: float,
        wall_s: float,
        round_s: float,
        loss: float,
        lr: float,
        images: int,
        phases: dict,
    ) -> None:
        """After round `round_done` (1-based), which took `round_s` and ended at `wall_s`:
        its loss, lr, images (all ranks) and phase seconds (summed over ranks)."""
        if self.every_s <= 0:
            return
        if self.start_wall is None:  # the first round of this process (a resumed run starts late)
            self.start_wall, self.start_round = wall_s - round_s, round_done - 1
            self.interval.since = self.start_wall
        self.interval.images += images
        for k, v in phases.items():
            self.interval.phases[k] = self.interval.phases.get(k, 0.0) + v
        rate = (wall_s - self.start_wall) / max(1, round_done - self.start_round)
        eta = rate * (self.n_rounds - round_done)
        if self.bar is not None:
            self.bar.update(round_done, f"epoch {epoch:.2f} loss {loss:.4f} lr {lr:.4g} ETA {clock(eta)}")
            return
        now = time.monotonic()
        if now - self.last_line < self.every_s and round_done < self.n_rounds:
            return
        seconds = wall_s - self.interval.since
        busy = sum(self.interval.phases.values()) or 1.0
        shares = " ".join(f"{k} {100 * v / busy:.0f}%" for k, v in self.interval.phases.items())
        self.write(
            f"epoch {epoch:.2f}/{self.total_epochs:g} round {round_done}/{self.n_rounds} train loss {loss:.4f} "
            f"lr {lr:.4g} | {self.interval.images / max(seconds, 1e-9):.0f} images/s ({shares}) | "
            f"elapsed {clock(wall_s)} ETA {clock(eta)}"
        )
        self.last_line, self.interval = now, Interval(since=wall_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.clear()


class Bar:
    """One line redrawn in place: `37% |#######      | round 35/94 <text>`, at most 5 times a second."""

    def __init__(self, stream, total: int):
        self.stream, self.total = stream, max(1, total)
        self.done, self.text, self.shown, self.last = 0, "", 0, 0.0

    def update(self, done: int, text: str) -> None:
        self.done, self.text = done, text
        if time.monotonic() - self.last >= 0.2 or done >= self.total:
            self.draw()

    def draw(self) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        frac = min(1.0, self.done / self.total)
        cells = 20
        line = f"{100 * frac:3.0f}% |{'#' * int(frac * cells):{cells}s}| round {self.done}/{self.total} {self.text}"
        line = line[: max(10, width - 1)]
        self.stream.write("\r" + line + " " * max(0, self.shown - len(line)))
        self.stream.flush()
        self.shown, self.last = len(line), time.monotonic()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0
