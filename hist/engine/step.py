"""One optimisation step, as the round loop runs it.

It stands apart from the loop so that `hist-bench` times exactly this step beside a bare
PyTorch step (`analysis/steps.py`): whatever the loop adds to a step lives here, or it is not
paid per step.
"""

from __future__ import annotations

import torch

from ..methods import Method
from .clock import PhaseClock
from .precision import Precision


class TrainStep:
    """Forward and loss under the precision's autocast, backward, the method's gradient
    synchronisation (timed as sync) and the optimizer step through the method."""

    def __init__(self, model: torch.nn.Module, method: Method, precision: Precision, clock: PhaseClock):
        self.model, self.method, self.precision, self.clock = model, method, precision, clock
        self.optimizer = method.optimizer
        self.lr: float | None = None

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
        self.clock.lap("compute")
        self.method.after_backward()
        self.clock.lap("sync")
        self.precision.step(self.optimizer, self.method)
        self.clock.lap("compute")
        return loss.detach()
