"""The training loop and its three methods: IST, local SGD and synchronous data parallel.

The loop runs rounds of `local_iters` steps. A method decides what a round trains and how
it is synchronised; the loop times data, compute and synchronisation, evaluates the global
model, checkpoints, and hands each round's figures to a recorder (it never sees HDF5).
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import Config
from .errors import CollectiveError, HistError
from .data import DeviceLoader
from .models import PreActResNet, shared_and_partitioned
from .plan import Plan, make_plan
from .sync import Synchroniser


# ---------------------------------------------------------------- learning rate

def peak_lr(cfg: Config, world_size: int) -> float:
    """The peak learning rate: `--lr`, times the process count under `--lr-scaling linear`
    (Goyal et al.: N processes see N times the images per step, or per round)."""
    return cfg.lr * (world_size if cfg.lr_scaling == "linear" else 1)


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: Config, peak: float | None = None) -> float:
    peak = cfg.lr if peak is None else peak
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return peak * (0.1 + 0.9 * step / warm)
    frac = step / max(1, total_steps)
    if cfg.schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return peak * (0.01 if frac >= 0.75 else 0.1 if frac >= 0.5 else 1.0)


# ---------------------------------------------------------------- methods

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

    def __init__(self, model: PreActResNet, sync: Synchroniser, cfg: Config, optimizer,
                 warm_rounds: int = 0):
        self.model, self.sync, self.cfg, self.optimizer = model, sync, cfg, optimizer
        self.shared, self.blocks = shared_and_partitioned(model)
        self.warm_rounds = warm_rounds

    def begin_round(self, r: int) -> None:
        self.model.set_full()

    def after_backward(self) -> None:
        """Gradient synchronisation within the step (timed as sync)."""

    def step(self) -> None:
        self.optimizer.step()

    def end_round(self, r: int, full: bool) -> None:
        """Aggregation at the end of round r; `full` means every rank needs the whole model."""

    def eval_scale(self) -> float:
        return 1.0

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
        self.outer_buffers = ({p: torch.zeros_like(p) for p in self.params}
                              if cfg.outer_momentum > 0 else {})
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


class IST(Averaging):
    """Independent subnetwork training: each subnetwork trains its share of layer3[1:].

    With `--warmup-local-sgd-epochs`, the first rounds are local SGD on the full model (the
    ResIST release needs this on ImageNet); IST starts at the first round after them.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.plan: Plan | None = None
        self.warm = False

    def plan_for(self, r: int) -> Plan:
        return make_plan(self.cfg.seed, r, len(self.blocks), self.sync.subnets, self.cfg.min_depth)

    def begin_round(self, r: int) -> None:
        super().begin_round(r)
        self.warm = r < self.warm_rounds
        if self.warm:
            self.plan = None
            self.model.set_full()
        else:
            self.plan = self.plan_for(r)
            if r % self.cfg.plan_check_every == 0:
                self.sync.check_same(self.plan.digest, f"subnetwork plan of round {r}")
            self.model.set_subnetwork(self.plan.blocks[self.sync.subnet])
        if self.outer or self.cfg.shared_precision == "fp16":
            self.snapshot(self.active_params())

    def my_blocks(self) -> list[int]:
        return list(self.plan.blocks[self.sync.subnet]) if self.plan is not None else list(range(len(self.blocks)))

    def active_params(self):
        return self.shared + [p for b in self.my_blocks() for p in self.blocks[b]]

    def after_backward(self) -> None:
        self.sync.average_gradients(self.active_params())

    def end_round(self, r: int, full: bool) -> None:
        if self.warm:  # local SGD: afterwards every rank holds the whole model
            self.average_everything()
            return
        if self.cfg.shared_precision == "fp16":
            self.sync.average_changes_over_world(self.shared, [self.starts[p] for p in self.shared])
            if self.average_state:
                self.sync.average_over_world(momentum_buffers(self.optimizer, self.shared))
        else:
            self.sync.average_over_world(self.carried(self.shared, outer=False))
        if self.outer:
            self.outer_step(self.shared)
        next_plan = None if full else self.plan_for(r + 1)
        travelling = [self.carried(ps, outer=True) for ps in self.blocks]
        if self.outer:  # average among holders, step, then deliver the stepped block
            self.sync.sync_blocks(travelling, self.plan, next_plan, self.cfg.aggregate, kinds=("allreduce",))
            self.outer_step([p for b in self.my_blocks() for p in self.blocks[b]])
            self.sync.sync_blocks(travelling, self.plan, next_plan, self.cfg.aggregate, kinds=("bcast",))
        else:
            self.sync.sync_blocks(travelling, self.plan, next_plan, self.cfg.aggregate)

    def eval_scale(self) -> float:
        # Each block trained in a fraction p of the subnetworks; scaling its residual branch by p
        # keeps the full network's activations at the size the subnetworks were trained with.
        # (Group sizes, hence p, are the same every round.) After local-SGD warm-up rounds the
        # full network was trained as it is evaluated.
        if self.sync.subnets == 1 or self.warm:
            return 1.0
        return self.plan_for(0).keep_fraction()


class LocalSGD(Averaging):
    """The full model on every rank, averaged every round."""

    def begin_round(self, r: int) -> None:
        super().begin_round(r)
        self.model.set_full()
        if self.outer:
            self.snapshot(self.params)

    def end_round(self, r: int, full: bool) -> None:
        self.average_everything()


class DataParallel(Method):
    """Horovod synchronous data parallel: gradients averaged over all ranks every step."""

    def __init__(self, model, sync, cfg, optimizer, warm_rounds=0):
        super().__init__(model, sync, cfg, sync.distributed_optimizer(optimizer, model), warm_rounds)

    def after_backward(self) -> None:
        # Horovod: wait for the allreduces started during backward; the wait is the sync time.
        self.optimizer.synchronize()
        self.sync.traffic.allreduce(sum(p.numel() * p.element_size() for p in self.model.parameters()),
                                    self.sync.size)

    def step(self) -> None:
        # Horovod: the gradients are already averaged (synchronize above).
        with self.optimizer.skip_synchronize():
            self.optimizer.step()


METHOD_CLASSES = {"ist": IST, "local-sgd": LocalSGD, "dp": DataParallel}


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches) -> None:
    """Recompute BatchNorm statistics for the full model: running statistics gathered by
    subnetworks describe shallower networks, so they are not kept or communicated at all."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for x, _ in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom


@torch.no_grad()
def evaluate(model, test: DeviceLoader, calibration, sync: Synchroniser, scale: float,
             batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy %) of the full model on the whole test split, shared among ranks."""
    model.set_full(scale)
    recalibrate_batchnorm(model, calibration)
    model.eval()
    loss_sum = correct = 0.0
    count = 0
    for x, y in test.eval_batches(batch_size, sync.rank, sync.size):
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    total = sync.sum_over_world([loss_sum, correct, count])
    model.train()
    return total[0] / total[2], 100.0 * total[1] / total[2]


# ---------------------------------------------------------------- the loop

@dataclass
class RoundStats:
    """One rank's figures for one round."""
    compute_s: float = 0.0
    data_s: float = 0.0
    sync_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    loss: float = 0.0


@dataclass
class Result:
    rounds: int
    final_loss: float | None
    final_accuracy: float | None
    wall_s: float
    stopped_early: bool = False
    history: list = field(default_factory=list)


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


class GuardedWriter:
    """Rank 0's writes (timing file, checkpoints): the first failure is kept, not raised, so
    that the ranks can agree on it at the round end; later writes are skipped."""

    def __init__(self, recorder):
        self.recorder, self.error = recorder, None

    def guard(self, fn, *args) -> None:
        if self.error is None:
            try:
                fn(*args)
            except HistError as e:
                self.error = e

    def __getattr__(self, name):  # add_round, add_eval, finish: no-ops off rank 0
        method = getattr(self.recorder, name, None) if self.recorder is not None else None
        return (lambda *args: self.guard(method, *args)) if method is not None else (lambda *args: None)


def _cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(cfg: Config, model: PreActResNet, sync: Synchroniser, train_data: DeviceLoader,
          test_data: DeviceLoader, recorder=None, checkpoint_path=None, log=print,
          stop: StopFlag | None = None, resume_state: dict | None = None,
          identity: dict | None = None) -> Result:
    """Run rounds until the epochs are done or a stop is requested; returns the final figures.

    `recorder` (rank 0 only) receives add_round/add_eval/finish; None elsewhere.
    """
    device = next(model.parameters()).device
    stop = stop or StopFlag(cfg.stop_signal)
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    n_rounds = math.ceil(total_steps / cfg.local_iters)
    peak = peak_lr(cfg, sync.size)
    warm_rounds = math.ceil(cfg.warmup_local_sgd_epochs * steps_per_epoch / cfg.local_iters)
    method_cls = METHOD_CLASSES[cfg.method] if sync.size > 1 else Method
    method = method_cls(model, sync, cfg, torch.optim.SGD(model.parameters(), lr=peak, momentum=cfg.momentum,
                                                          weight_decay=cfg.weight_decay), warm_rounds)
    optimizer = method.optimizer
    start_round, wall_before = 0, 0.0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        if resume_state.get("optimizer") is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
        method.load_state_dict(resume_state.get("method") or {})
        start_round, wall_before = resume_state["round"], resume_state["wall_s"]
        log(f"resuming from {checkpoint_path} at round {start_round}")
    else:
        sync.broadcast_model(model)
    calibration = list(train_data.calibration_batches(cfg.bn_batches))
    t0 = time.perf_counter() - wall_before
    result = Result(n_rounds, None, None, 0.0)
    if start_round >= n_rounds:  # resuming a run that had finished: report its model again
        result.final_loss, result.final_accuracy = evaluate(
            model, test_data, calibration, sync, method.eval_scale(), cfg.eval_batch_size)
        log(f"the checkpoint is already at the last round ({n_rounds}); nothing left to train")
    loss_fn = torch.nn.CrossEntropyLoss()
    writer = GuardedWriter(recorder)

    for r in range(start_round, n_rounds):
        stats = RoundStats()
        sync.traffic.take()  # the round's byte count starts at zero
        t = time.perf_counter()
        method.begin_round(r)
        stats.sync_s += time.perf_counter() - t
        first, last = r * cfg.local_iters, min((r + 1) * cfg.local_iters, total_steps)
        loss_sum = torch.zeros((), device=device)
        for step in range(first, last):
            t = time.perf_counter()
            x, y = train_data.batch(step)
            _cuda_sync(device)
            t1 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, steps_per_epoch, cfg, peak)
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            t2 = time.perf_counter()
            method.after_backward()
            t3 = time.perf_counter()
            method.step()
            loss_sum += loss.detach()
            _cuda_sync(device)
            t4 = time.perf_counter()
            stats.data_s += t1 - t
            stats.compute_s += (t2 - t1) + (t4 - t3)
            stats.sync_s += t3 - t2
        stats.loss = loss_sum.item() / (last - first)

        t = time.perf_counter()
        # One allreduce carries the stop flag and, per rank, whether its loss is still finite.
        flags = sync.sum_over_world([float(stop.raised)] + [float(i == sync.rank and not math.isfinite(stats.loss))
                                                            for i in range(sync.size)])
        stop_now = flags[0] > 0
        diverged = [i for i in range(sync.size) if flags[1 + i] > 0]
        if diverged:
            writer.finish("diverged", time.perf_counter() - t0)
            raise CollectiveError(
                f"training diverged in round {r + 1} (epoch {last / steps_per_epoch:.2f}): the loss on "
                f"rank{'s' if len(diverged) > 1 else ''} {', '.join(map(str, diverged))} is not finite; "
                f"nothing of this round was kept (the timing file has the good rounds, status 'diverged'"
                f"{', the last checkpoint is unchanged' if checkpoint_path and Path(checkpoint_path).exists() else ''}); "
                f"try a lower --lr or a --warmup-epochs of 1 or more")
        final = r == n_rounds - 1
        evaluate_now = final or (cfg.eval_every and (r + 1) % cfg.eval_every == 0) or (
            cfg.eval_every_epochs and math.floor(last / steps_per_epoch / cfg.eval_every_epochs)
            > math.floor(first / steps_per_epoch / cfg.eval_every_epochs))
        checkpoint_now = stop_now or final or (cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0)
        method.end_round(r, full=bool(evaluate_now or checkpoint_now))
        _cuda_sync(device)
        stats.sync_s += time.perf_counter() - t
        stats.bytes_sent, stats.bytes_received = (int(v) for v in sync.traffic.take())

        wall = time.perf_counter() - t0
        epoch = last / steps_per_epoch
        gathered = sync.gather(stats)
        if recorder is not None:
            per_rank = {k: [getattr(s, k) for s in gathered] for k in RoundStats.__dataclass_fields__}
            writer.add_round(r, last - first, epoch, wall, per_rank)
        result.history.append(stats.loss)
        if evaluate_now:
            loss, acc = evaluate(model, test_data, calibration, sync, method.eval_scale(), cfg.eval_batch_size)
            result.final_loss, result.final_accuracy = loss, acc
            writer.add_eval(r, epoch, time.perf_counter() - t0, loss, acc)
            log(f"round {r + 1}/{n_rounds} epoch {epoch:.2f} train loss {stats.loss:.4f} "
                f"test loss {loss:.4f} test accuracy {acc:.2f}%")
        elif sys.stderr.isatty() and sync.rank == 0:
            sys.stderr.write(f"\rround {r + 1}/{n_rounds} epoch {epoch:.2f} loss {stats.loss:.4f}")
            sys.stderr.flush()
        if checkpoint_now and checkpoint_path is not None and sync.rank == 0:
            writer.guard(ckpt.save, checkpoint_path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if method.keeps_optimizer_state else None,
                "method": method.state_dict(),
                "round": r + 1, "wall_s": time.perf_counter() - t0, "identity": identity,
                "config": cfg.as_dict()})
        # Ranks agree on rank 0's writes, so a full disk ends every rank, none waits.
        if sync.any_over_world(writer.error is not None):
            raise CollectiveError(str(writer.error) if writer.error else "rank 0 could not write its files")
        if stop_now and not final:
            result.stopped_early = True
            log(f"stopping at round {r + 1} on a signal; checkpoint written, resume with --resume")
            break
    result.wall_s = time.perf_counter() - t0
    return result
