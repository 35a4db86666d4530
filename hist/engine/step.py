"""One optimisation step, as the round loop runs it.

It stands apart from the loop so that `hist-bench` times exactly this step beside a bare
PyTorch step (`analysis/steps.py`): whatever the loop adds to a step lives here, or it is not
paid per step.
"""

from __future__ import annotations

import torch

from ..api import Training
from ..config import Config
from ..methods import build_optimizer
from .clock import PhaseClock
from .precision import Precision


class TrainStep:
    """Forward and loss under the precision's autocast, backward, and the optimizer step through
    the session (`api.Training`), whose hooks synchronise the gradients (timed as sync) and end
    a round at its last step. The loss is added to the round's sum before the step, so the
    round's end can read it."""

    def __init__(self, model: torch.nn.Module, session: Training, precision: Precision, clock: PhaseClock):
        self.model, self.session, self.precision, self.clock = model, session, precision, clock
        self.optimizer = session.optimizer
        self.lr: float | None = None
        self.loss_sum = torch.zeros((), device=next(model.parameters()).device)

    def take_loss(self) -> float:
        """The losses summed since the last call (one host read), and a fresh sum."""
        total, self.loss_sum = self.loss_sum.item(), torch.zeros_like(self.loss_sum)
        return total

    def set_lr(self, lr: float) -> None:
        """The schedule's rate for the next step (kept for the round's record)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step on (x, y); returns the detached loss (no host read)."""
        # The optimizer's own list, not Module.zero_grad, which walks every submodule each step
        # (0.5 ms a step for ResNet-101, found by hist-bench's bare step); no argument, because
        # Horovod's DistributedOptimizer takes none (torch's default sets the gradients to None).
        self.optimizer.zero_grad()
        with self.precision.autocast():
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.precision.backward(loss)
        self.loss_sum += loss.detach().float()
        self.precision.step(self.optimizer, self.session.optimizer_step)
        self.clock.lap("compute")
        return loss.detach()


def one_round_step(cfg: Config, model: torch.nn.Module, sync, lr: float, precision: Precision, clock: PhaseClock):
    """The step hist-train takes, in a session whose one round never ends (timing a step alone:
    hist-bench, the ResIST side-by-side), its plan that of round 0."""
    session = Training(model, build_optimizer(cfg, model, lr), cfg, sync, round_starts=[0, 2**62],
                       on_round_end=None, clock=clock, scaler=precision.scaler)  # fmt: skip
    session.begin_round()
    return TrainStep(model, session, precision, clock)
