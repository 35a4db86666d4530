"""Stop requests: Slurm's time-limit warning and SIGTERM, acted on at a round end."""

from __future__ import annotations

import signal

STOP_SIGNALS = {"USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2, "TERM": signal.SIGTERM}


class StopFlag:
    """Set by SIGTERM or the chosen warning signal (Slurm's `--signal` before the time limit);
    acted on at a round end. USR2 is the default: NCCL installs its own SIGUSR1 handler."""

    def __init__(self, warning: str = "USR2"):
        self.raised = False
        self.signals = {signal.SIGTERM, STOP_SIGNALS[warning]}

    def install(self) -> None:
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True
