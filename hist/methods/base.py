"""The hooks every method offers the loop, and what the round-averaging methods share.

The loop calls only these hooks: begin a round, after backward, the optimizer step, end the
round, the evaluation scale, and the state to checkpoint. It never names a method class,
Horovod or MPI; a method talks to the other ranks through the `Synchroniser`.
"""

from __future__ import annotations

import torch

from ..comm import CompressedAverage, Pending, Synchroniser
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


def _adam_state(p, group) -> dict:
    """Adam's (and AdamW's) state of `p` as its first step creates it (torch.optim.Adam._init_group)."""
    from torch.optim.optimizer import _get_scalar_dtype

    on_device = group.get("capturable") or group.get("fused")
    step = (
        torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device)
        if on_device
        else torch.tensor(0.0, dtype=_get_scalar_dtype())
    )
    state = {"step": step, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format)}
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def has_optimizer_state(optimizer) -> bool:
    """Whether `optimizer` keeps state worth aggregating: SGD with momentum, Adam, AdamW."""
    if isinstance(optimizer, torch.optim.Adam):  # AdamW too (a subclass)
        return True
    return any(group.get("momentum", 0) > 0 for group in optimizer.param_groups)


def optimizer_state(optimizer, params) -> list[torch.Tensor]:
    """The optimizer state aggregated with `params`, the same list on every rank, created where
    missing exactly as the optimizer's first step would create it: SGD's momentum buffers
    (`momentum_buffers`); Adam's and AdamW's moments, shaped like their parameter. Adam's step
    count is a scalar that does not travel (hist.api sets it to the run's after each round)."""
    if not isinstance(optimizer, torch.optim.Adam):
        return momentum_buffers(optimizer, params)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p in params:
        if not optimizer.state[p]:
            optimizer.state[p] = _adam_state(p, group_of[id(p)])
    return [optimizer.state[p][k] for k in ADAM_MOMENTS for p in params if k in optimizer.state[p]]


class Method:
    """What a round trains and how it is synchronised. The loop calls only these hooks."""

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

    def end_round(self, r: int, full: bool, stop_only: bool = False) -> None:
        """Aggregation at the end of round r; `full` means every rank needs the whole model;
        `stop_only` that it does only because the run stops here (a run resumed from here goes
        on as if this round had not been full)."""

    def eval_scale(self) -> float:
        return 1.0

    def observe_round(self, steps: int, data_s, compute_s) -> None:
        """Every rank's data and compute seconds of the round just trained, the same on every rank
        (they ride on the loop's flag allreduce), before `end_round`."""

    def blocks_per_subnet(self) -> list[int] | None:
        """Partitioned blocks each subnetwork trained this round (None: every rank the full model)."""
        return None

    def state_dict(self) -> dict:
        """Method state beyond the model and optimizer, for the checkpoint. Collective: every rank
        calls it at a checkpoint (per-rank state, such as error-feedback residuals, is gathered)."""
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
    - `--shared-precision`/`--shared-topk`: what travels when weights are averaged over every
      rank (IST's shared parameters, local SGD's whole model), momentum included: the fp32
      weights; the round's change in fp16 (allreduce); or the change packed in int8/int4
      and/or top-k with error feedback (`comm.CompressedAverage`). The change is taken from the
      round's start, which every rank holds.
    - `--outer-lr`/`--outer-momentum`: DiLoCo's outer optimizer. The round's aggregated change
      is treated as a gradient for one Nesterov SGD step from the round's start; the outer
      momentum of a block travels with the block. lr 1 and momentum 0 is plain aggregation.
    """

    def __init__(self, *args):
        super().__init__(*args)
        cfg = self.cfg
        self.params = list(self.model.parameters())
        self.average_state = cfg.optimizer_state == "average" and has_optimizer_state(self.optimizer)
        self.outer = cfg.outer_lr != 1.0 or cfg.outer_momentum > 0
        self.outer_buffers = {p: torch.zeros_like(p) for p in self.params} if cfg.outer_momentum > 0 else {}
        self.starts: dict[torch.Tensor, torch.Tensor] = {}
        self.sends_change = cfg.shared_precision != "fp32" or cfg.shared_topk > 0
        self.packed = cfg.shared_precision in ("int8", "int4") or cfg.shared_topk > 0
        # One per set of averaged tensors ("shared", "all"): each keeps this rank's residuals.
        self.compressors: dict[str, CompressedAverage] = {}
        if self.average_state:
            optimizer_state(self.optimizer, self.params)

    def begin_round(self, r: int) -> None:
        if not self.average_state:
            self.optimizer.state.clear()

    def snapshot(self, params) -> None:
        """Remember where the round starts (identical on every rank that trains `params`)."""
        self.starts = {p: p.detach().clone() for p in params}

    def round_start(self, params) -> None:
        """Remember where the round starts: for the outer step, and for every tensor averaged
        as its change (the weights and their momentum)."""
        self.snapshot(self.carried(params, outer=False) if self.sends_change else params)

    def start_average(self, params, name: str):
        """Start averaging `params` and their optimizer state over every rank at
        --shared-precision; the packed kinds complete before this returns."""
        tensors = self.carried(params, outer=False)
        if not self.sends_change:
            return self.sync.start_average_over_world(tensors)
        starts = [self.starts[t] for t in tensors]
        if not self.packed:
            return self.sync.start_average_changes_over_world(tensors, starts)
        compressor = self.compressors.get(name)
        if compressor is None:
            compressor = self.compressors[name] = CompressedAverage(self.cfg.shared_precision, self.cfg.shared_topk)
        compressor.average(self.sync, tensors, starts)
        return Pending()

    def carried(self, params, outer: bool) -> list[torch.Tensor]:
        """The tensors aggregated with `params`: the weights, then their optimizer state."""
        out = list(params)
        if self.average_state:
            out += optimizer_state(self.optimizer, params)
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
        self.start_average(self.params, "all").wait()
        if self.outer:
            self.outer_step(self.params)

    def state_dict(self) -> dict:
        state = {"outer_momentum": [self.outer_buffers[p] for p in self.params] if self.outer_buffers else None}
        if self.compressors:  # the residuals differ from rank to rank: every rank's, by rank
            mine = {name: c.state_dict() for name, c in sorted(self.compressors.items())}
            state["residuals"] = self.sync.allgather(mine)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("outer_momentum")
        if saved is not None and self.outer_buffers:
            for p, value in zip(self.params, saved):
                self.outer_buffers[p].copy_(value)
        residuals = state.get("residuals")
        if residuals and self.packed:
            device = self.params[0].device
            for name, saved in residuals[self.sync.rank].items():
                c = self.compressors[name] = CompressedAverage(self.cfg.shared_precision, self.cfg.shared_topk)
                c.load_state_dict({k: v.to(device) if v is not None else None for k, v in saved.items()})
