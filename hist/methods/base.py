"""The hooks every method offers the loop, and what the round-averaging methods share.

The loop calls only these hooks: begin a round, after backward, the optimizer step, end the
round, the evaluation scale, and the state to checkpoint. It never names a method class,
Horovod or MPI; a method talks to the other ranks through the `Synchroniser`.
"""

from __future__ import annotations

import torch

from ..comm import Synchroniser
from ..config import Config
from ..models import PreActResNet, shared_and_partitioned


def momentum_buffers(optimizer, params) -> list[torch.Tensor]:
    """SGD's momentum buffers of `params`, created as zeros where missing: SGD's first step
    then sets them to the gradient, exactly as when it creates them itself."""
    out = []
    for p in params:
        state = optimizer.state[p]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        out.append(state["momentum_buffer"])
    return out


class Method:
    """What a round trains and how it is synchronised. The loop calls only these hooks."""

    # Whether the optimizer state in a checkpoint is the same on every rank (then it is saved).
    keeps_optimizer_state = True

    def __init__(self, model: PreActResNet, sync: Synchroniser, cfg: Config, optimizer, warm_rounds: int = 0):
        self.model, self.sync, self.cfg, self.optimizer = model, sync, cfg, optimizer
        self.shared, self.blocks = shared_and_partitioned(model)
        self.warm_rounds = warm_rounds

    def begin_round(self, r: int) -> None:
        self.model.set_full()

    def after_backward(self) -> None:
        """Gradient synchronisation within the step (timed as sync)."""

    def step(self, step_fn=None) -> None:
        """The optimizer step; `step_fn(optimizer)` replaces `optimizer.step()` (a gradient scaler's step)."""
        if step_fn is None:
            self.optimizer.step()
        else:
            step_fn(self.optimizer)

    def end_round(self, r: int, full: bool) -> None:
        """Aggregation at the end of round r; `full` means every rank needs the whole model."""

    def eval_scale(self) -> float:
        return 1.0

    def observe_round(self, steps: int, data_s, compute_s) -> None:
        """Every rank's data and compute seconds of the round just trained, the same on every rank
        (they ride on the loop's flag allreduce), before `end_round`."""

    def blocks_per_subnet(self) -> list[int] | None:
        """Partitioned blocks each subnetwork trained this round (None: every rank the full model)."""
        return None

    def state_dict(self) -> dict:
        """Method state beyond the model and optimizer, identical on every rank after a full sync."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Averaging(Method):
    """Methods that train apart for a round, then aggregate (local SGD, IST).

    Two choices shape a round boundary:
    - `--optimizer-state`: `restart` zeroes SGD momentum every round, as the ResIST reference
      does; `average` aggregates the momentum buffers exactly like the weights they belong to
      (averaged over the ranks that average the weight, or carried with a block to the ranks
      that train it next), so momentum survives the round.
    - `--outer-lr`/`--outer-momentum`: DiLoCo's outer optimizer. The round's aggregated change
      is treated as a gradient for one Nesterov SGD step from the round's start; the outer
      momentum of a block travels with the block. lr 1 and momentum 0 is plain aggregation.
    """

    def __init__(self, *args):
        super().__init__(*args)
        cfg = self.cfg
        self.params = list(self.model.parameters())
        self.average_state = cfg.optimizer_state == "average" and cfg.momentum > 0
        self.keeps_optimizer_state = self.average_state
        self.outer = cfg.outer_lr != 1.0 or cfg.outer_momentum > 0
        self.outer_buffers = {p: torch.zeros_like(p) for p in self.params} if cfg.outer_momentum > 0 else {}
        self.starts: dict[torch.Tensor, torch.Tensor] = {}
        if self.average_state:
            momentum_buffers(self.optimizer, self.params)

    def begin_round(self, r: int) -> None:
        if not self.average_state:
            self.optimizer.state.clear()

    def snapshot(self, params) -> None:
        """Remember where the round starts (identical on every rank that trains `params`)."""
        self.starts = {p: p.detach().clone() for p in params}

    def carried(self, params, outer: bool) -> list[torch.Tensor]:
        """The tensors aggregated with `params`: the weights, then their optimizer state."""
        out = list(params)
        if self.average_state:
            out += momentum_buffers(self.optimizer, params)
        if outer and self.outer_buffers:
            out += [self.outer_buffers[p] for p in params]
        return out

    @torch.no_grad()
    def outer_step(self, params) -> None:
        lr, mu = self.cfg.outer_lr, self.cfg.outer_momentum
        for p in params:
            start = self.starts[p]
            change = start - p  # the pseudo-gradient: minus the round's aggregated change
            if mu:
                buf = self.outer_buffers[p]
                buf.mul_(mu).add_(change)
                change = change.add(buf, alpha=mu)  # Nesterov
            p.copy_(start - lr * change)

    def average_everything(self) -> None:
        """Local SGD's aggregation: every weight (and its state) averaged over all ranks."""
        self.sync.average_over_world(self.carried(self.params, outer=False))
        if self.outer:
            self.outer_step(self.params)

    def state_dict(self) -> dict:
        return {"outer_momentum": [self.outer_buffers[p] for p in self.params] if self.outer_buffers else None}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("outer_momentum")
        if saved is not None and self.outer_buffers:
            for p, value in zip(self.params, saved):
                self.outer_buffers[p].copy_(value)
