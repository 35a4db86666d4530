"""Stop requests: Slurm's time-limit warning, SIGTERM, or a round count, acted on at a round end."""

from __future__ import annotations

import signal

STOP_SIGNALS = {"USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2, "TERM": signal.SIGTERM}


class StopFlag:
    """Set by SIGTERM or the chosen warning signal (Slurm's `--signal` before the time limit);
    acted on at a round end. USR2 is the default: NCCL installs its own SIGUSR1 handler.

    `after_rounds` > 0 also raises it at this process's that-many-th round end
    (`--stop-after-rounds`): a check can stop a run at a known round without racing a signal
    against the run's own pace."""

    def __init__(self, warning: str = "USR2", after_rounds: int = 0):
        self._signalled = False
        self.signals = {signal.SIGTERM, STOP_SIGNALS[warning]}
        self.after_rounds, self._round_ends = after_rounds, 0

    @property
    def raised(self) -> bool:
        """Asked once at every round end (the loop's agreement on stopping), so the asks count
        the round ends."""
        self._round_ends += 1
        return self._signalled or 0 < self.after_rounds <= self._round_ends

    def install(self) -> None:
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._signalled = True
