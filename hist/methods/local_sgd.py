"""Local SGD: the full model on every rank, averaged every round."""

from __future__ import annotations

from .base import Averaging


class LocalSGD(Averaging):
    """The full model on every rank, averaged every round."""

    def begin_round(self, r: int) -> None:
        super().begin_round(r)
        self.model.set_full()
        if self.outer or self.sends_change:
            self.round_start(self.params)

    def end_round(self, r: int, full: bool, stop_only: bool = False) -> None:
        self.average_everything()
