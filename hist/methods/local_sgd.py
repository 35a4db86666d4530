"""Local SGD: the full model on every rank, averaged every round."""

from __future__ import annotations

from .base import Averaging


class LocalSGD(Averaging):
    """The full model on every rank, averaged every round."""

    def begin_round(self, r: int) -> None:
        super().begin_round(r)
        self.model.set_full()
        if self.outer:
            self.snapshot(self.params)

    def end_round(self, r: int, full: bool) -> None:
        self.average_everything()
