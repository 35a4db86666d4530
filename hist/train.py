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

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import Config
from .data import DeviceLoader
from .models import PreActResNet, shared_and_partitioned
from .plan import Plan, make_plan
from .sync import Synchroniser


# ---------------------------------------------------------------- learning rate

def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: Config) -> float:
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (0.1 + 0.9 * step / warm)
    frac = step / max(1, total_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return cfg.lr * (0.01 if frac >= 0.75 else 0.1 if frac >= 0.5 else 1.0)


# ---------------------------------------------------------------- methods

class Method:
    """What a round trains and how it is synchronised. Subclasses override the hooks."""

    name = "single"
    # Momentum survives a round only where no aggregate replaces the parameters.
    keeps_optimizer_state = True

    def __init__(self, model: PreActResNet, sync: Synchroniser, cfg: Config, optimizer):
        self.model, self.sync, self.cfg, self.optimizer = model, sync, cfg, optimizer
        self.shared, self.blocks = shared_and_partitioned(model)

    def begin_round(self, r: int) -> None:
        self.model.set_full()

    def after_backward(self) -> None:
        """Gradient synchronisation within the step (timed as sync)."""

    def end_round(self, r: int, full: bool) -> None:
        """Aggregation at the end of round r; `full` means every rank needs the whole model."""

    def eval_scale(self) -> float:
        return 1.0


class IST(Method):
    """Independent subnetwork training: each subnetwork trains its share of layer3[1:]."""

    name = "ist"
    # The reference code restarts the optimizer at every repartition, and so does hist: after
    # aggregation the shared parameters are an average and most blocks come from another
    # subnetwork, so a momentum buffer describes a trajectory the weights are no longer on.
    # It also makes a round a clean boundary: a checkpoint needs no per-rank optimizer state.
    keeps_optimizer_state = False

    def __init__(self, *args):
        super().__init__(*args)
        self.plan: Plan | None = None

    def plan_for(self, r: int) -> Plan:
        return make_plan(self.cfg.seed, r, len(self.blocks), self.sync.subnets, self.cfg.min_depth)

    def begin_round(self, r: int) -> None:
        self.plan = self.plan_for(r)
        if r % self.cfg.plan_check_every == 0:
            self.sync.check_same(self.plan.digest, f"subnetwork plan of round {r}")
        self.model.set_subnetwork(self.plan.blocks[self.sync.subnet])
        self.optimizer.state.clear()
        if self.cfg.shared_precision == "fp16":  # the round's start, identical on every rank
            self.shared_start = [p.detach().clone() for p in self.shared]

    def active_params(self):
        mine = self.plan.blocks[self.sync.subnet]
        return self.shared + [p for b in mine for p in self.blocks[b]]

    def after_backward(self) -> None:
        self.sync.average_gradients(self.active_params())

    def end_round(self, r: int, full: bool) -> None:
        if self.cfg.shared_precision == "fp16":
            self.sync.average_changes_over_world(self.shared, self.shared_start)
        else:
            self.sync.average_over_world(self.shared)
        next_plan = None if full else self.plan_for(r + 1)
        self.sync.sync_blocks(self.blocks, self.plan, next_plan, self.cfg.aggregate)

    def eval_scale(self) -> float:
        # Each block trained in a fraction p of the subnetworks; scaling its residual branch by p
        # keeps the full network's activations at the size the subnetworks were trained with.
        # (Group sizes, hence p, are the same every round.)
        return self.plan_for(0).keep_fraction() if self.sync.subnets > 1 else 1.0


class LocalSGD(Method):
    """The full model on every rank, averaged every round."""

    name = "local-sgd"
    keeps_optimizer_state = False  # as IST: the averaged weights invalidate local momentum

    def begin_round(self, r: int) -> None:
        self.model.set_full()
        self.optimizer.state.clear()

    def end_round(self, r: int, full: bool) -> None:
        self.sync.average_over_world(list(self.model.parameters()))


class DataParallel(Method):
    """Horovod synchronous data parallel: gradients averaged over all ranks every step."""

    name = "dp"

    def after_backward(self) -> None:
        # Horovod: wait for the allreduces started during backward; the wait is the sync time.
        self.optimizer.synchronize()
        self.sync.traffic.allreduce(sum(p.numel() * p.element_size() for p in self.model.parameters()),
                                    self.sync.size)


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


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm's warning before the time limit); acted on at a round end."""

    def __init__(self):
        self.raised = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True


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
    stop = stop or StopFlag()
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    n_rounds = math.ceil(total_steps / cfg.local_iters)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    method_cls = METHOD_CLASSES[cfg.method] if sync.size > 1 else Method
    if method_cls is DataParallel:
        optimizer = sync.distributed_optimizer(optimizer, model)
    method = method_cls(model, sync, cfg, optimizer)
    start_round, wall_before = 0, 0.0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        if resume_state.get("optimizer") is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
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
                group["lr"] = lr_at(step, total_steps, steps_per_epoch, cfg)
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            t2 = time.perf_counter()
            method.after_backward()
            t3 = time.perf_counter()
            if isinstance(method, DataParallel):
                with optimizer.skip_synchronize():
                    optimizer.step()
            else:
                optimizer.step()
            loss_sum += loss.detach()
            _cuda_sync(device)
            t4 = time.perf_counter()
            stats.data_s += t1 - t
            stats.compute_s += (t2 - t1) + (t4 - t3)
            stats.sync_s += t3 - t2
        stats.loss = loss_sum.item() / (last - first)

        t = time.perf_counter()
        stop_now = sync.sum_over_world([float(stop.raised)])[0] > 0
        final = r == n_rounds - 1
        evaluate_now = final or (cfg.eval_every and (r + 1) % cfg.eval_every == 0)
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
            recorder.add_round(r, last - first, epoch, wall, per_rank)
        result.history.append(stats.loss)
        if evaluate_now:
            loss, acc = evaluate(model, test_data, calibration, sync, method.eval_scale(), cfg.eval_batch_size)
            result.final_loss, result.final_accuracy = loss, acc
            if recorder is not None:
                recorder.add_eval(r, epoch, time.perf_counter() - t0, loss, acc)
            log(f"round {r + 1}/{n_rounds} epoch {epoch:.2f} train loss {stats.loss:.4f} "
                f"test loss {loss:.4f} test accuracy {acc:.2f}%")
        elif sys.stderr.isatty() and sync.rank == 0:
            sys.stderr.write(f"\rround {r + 1}/{n_rounds} epoch {epoch:.2f} loss {stats.loss:.4f}")
            sys.stderr.flush()
        if checkpoint_now and checkpoint_path is not None and sync.rank == 0:
            ckpt.save(checkpoint_path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if method.keeps_optimizer_state else None,
                "round": r + 1, "wall_s": time.perf_counter() - t0, "identity": identity,
                "config": cfg.as_dict()})
        if stop_now and not final:
            result.stopped_early = True
            log(f"stopping at round {r + 1} on a signal; checkpoint written, resume with --resume")
            break
    result.wall_s = time.perf_counter() - t0
    return result
