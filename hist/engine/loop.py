"""The round loop: one optimisation step at a time, in rounds (`rounds.round_starts`).

A method (built by the caller) decides what a round trains and how it is synchronised; the
loop times data, compute and synchronisation, evaluates the global model, asks for
checkpoints, agrees with the other ranks on stops, divergence and failed writes, and hands
each round's figures to a recorder. It knows neither HDF5 nor a method's internals.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..comm import Synchroniser
from ..config import Config
from ..data import DeviceLoader
from ..errors import CollectiveError, HistError
from ..methods import Method
from ..models import PreActResNet
from .clock import PhaseClock
from .evaluation import evaluate
from .noise import probe_noise
from .precision import Precision
from .rounds import round_starts
from .schedule import lr_at
from .signals import StopFlag
from .step import TrainStep


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
    final_top5: float | None = None
    # rank 0, over this process's rounds: images of all ranks, the mean rank's phase seconds, bytes sent by all
    totals: dict = field(default_factory=lambda: {"images": 0, "rounds": 0, "busy_s": 0.0, "sync_s": 0.0, "bytes": 0})


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
        if method is None:
            return lambda *args, **kwargs: None
        return lambda *args, **kwargs: self.guard(lambda: method(*args, **kwargs))


def train(
    cfg: Config,
    model: PreActResNet,
    method: Method,
    sync: Synchroniser,
    train_data: DeviceLoader,
    test_data: DeviceLoader,
    peak: float,
    recorder=None,
    save_checkpoint=None,
    log=print,
    stop: StopFlag | None = None,
    resume_state: dict | None = None,
    identity: dict | None = None,
    progress=None,
) -> Result:
    """Run rounds until the epochs are done or a stop is requested; returns the final figures.

    `recorder` (rank 0 only) receives add_round/add_eval/finish, `save_checkpoint` (rank 0
    only) a checkpoint's state, `progress` (rank 0 only, `engine.progress.Progress`) each
    round's figures for the log; all None elsewhere.
    """
    device = next(model.parameters()).device
    stop = stop or StopFlag(cfg.stop_signal)
    steps_per_epoch = train_data.steps_per_epoch
    starts = round_starts(cfg, steps_per_epoch, peak)
    total_steps, n_rounds = starts[-1], len(starts) - 1
    optimizer = method.optimizer
    precision = Precision(cfg.precision, device)
    start_round, wall_before = 0, 0.0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        if resume_state.get("optimizer") is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
        method.load_state_dict(resume_state.get("method") or {})
        precision.load_state(resume_state.get("precision"), sync.rank)
        start_round, wall_before = resume_state["round"], resume_state["wall_s"]
        log(f"resuming from the checkpoint at round {start_round}")
    else:
        sync.broadcast_model(model)
    t0 = time.perf_counter() - wall_before

    def evaluate_model():
        with precision.autocast():
            # BatchNorm calibration batches are made afresh each time (at 224 pixels, keeping
            # them would hold bn_batches full batches on the device for the whole run).
            calibration = train_data.calibration_batches(cfg.bn_batches)
            scale = method.eval_scale() if cfg.test_scale == "auto" else 1.0
            return evaluate(model, test_data, calibration, sync, scale, cfg.eval_batch_size, cfg.eval_bn)

    result = Result(n_rounds, None, None, 0.0)
    if start_round >= n_rounds:  # resuming a run that had finished: report its model again
        result.final_loss, result.final_accuracy, result.final_top5 = evaluate_model()
        log(f"the checkpoint is already at the last round ({n_rounds}); nothing left to train")
    writer = GuardedWriter(recorder)
    clock = PhaseClock(device)
    train_step = TrainStep(model, method, precision, clock)

    last_wall = time.perf_counter() - t0
    for r in range(start_round, n_rounds):
        stats = RoundStats()
        sync.traffic.take()  # the round's byte count starts at zero
        clock.start()
        method.begin_round(r)
        clock.lap("sync")
        first, last = starts[r], starts[r + 1]
        loss_sum = torch.zeros((), device=device)  # read once a round, not once a step
        for step in range(first, last):
            x, y = train_data.batch(step)
            clock.lap("data")
            train_step.set_lr(lr_at(step, total_steps, steps_per_epoch, cfg, peak))
            loss_sum += train_step(x, y).float()
        stats.loss = loss_sum.item() / (last - first)

        # One allreduce carries the stop flag and, per rank, whether its loss is still finite and its
        # data and compute seconds so far (for the method's `observe_round`, e.g. --balance speed).
        so_far = clock.read()
        mine = [i == sync.rank for i in range(sync.size)]
        flags = sync.sum_over_world(
            [float(stop.raised)]
            + [float(m and not math.isfinite(stats.loss)) for m in mine]
            + [so_far.get("data", 0.0) * m for m in mine]
            + [so_far.get("compute", 0.0) * m for m in mine]
        )
        n = sync.size
        method.observe_round(last - first, flags[1 + n : 1 + 2 * n], flags[1 + 2 * n : 1 + 3 * n])
        stop_now = flags[0] > 0
        diverged = [i for i in range(n) if flags[1 + i] > 0]
        if diverged:
            writer.finish("diverged", time.perf_counter() - t0)
            raise CollectiveError(
                f"training diverged in round {r + 1} (epoch {last / steps_per_epoch:.2f}): the loss on "
                f"rank{'s' if len(diverged) > 1 else ''} {', '.join(map(str, diverged))} is not finite; "
                f"nothing of this round was kept (the timing file has the good rounds, status 'diverged'"
                f", the last checkpoint, if any, is unchanged); "
                f"try a lower --lr or a --warmup-epochs of 1 or more"
            )
        final = r == n_rounds - 1
        evaluate_now = (
            final
            or (cfg.eval_every and (r + 1) % cfg.eval_every == 0)
            or (
                cfg.eval_every_epochs
                and math.floor(last / steps_per_epoch / cfg.eval_every_epochs)
                > math.floor(first / steps_per_epoch / cfg.eval_every_epochs)
            )
        )
        checkpoint_now = stop_now or final or (cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0)
        probe_now = cfg.noise_every and (r + 1) % cfg.noise_every == 0
        planned = evaluate_now or probe_now or (cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0)
        method.end_round(r, full=bool(planned or stop_now), stop_only=bool(stop_now and not planned))
        clock.lap("sync")
        phases = clock.read()
        stats.data_s, stats.compute_s, stats.sync_s = (phases.get(k, 0.0) for k in ("data", "compute", "sync"))
        stats.bytes_sent, stats.bytes_received = (int(v) for v in sync.traffic.take())

        wall = time.perf_counter() - t0
        epoch = last / steps_per_epoch
        gathered = sync.gather(stats)
        if recorder is not None or progress is not None:
            per_rank = {k: [getattr(s, k) for s in gathered] for k in RoundStats.__dataclass_fields__}
            writer.add_round(
                r, last - first, epoch, wall, per_rank, lr=train_step.lr, blocks=method.blocks_per_subnet()
            )
            t = result.totals
            t["images"] += (last - first) * cfg.batch_size * sync.size
            t["rounds"] += 1
            t["busy_s"] += sum(sum(per_rank[f"{k}_s"]) for k in ("data", "compute", "sync")) / sync.size
            t["sync_s"] += sum(per_rank["sync_s"]) / sync.size
            t["bytes"] += sum(per_rank["bytes_sent"])
            if progress is not None:
                phase_sums = {k: float(sum(per_rank[f"{k}_s"])) for k in ("data", "compute", "sync")}
                images = (last - first) * cfg.batch_size * sync.size
                mean_loss = sum(per_rank["loss"]) / len(per_rank["loss"])
                progress.update(r + 1, epoch, wall, wall - last_wall, mean_loss, train_step.lr, images, phase_sums)
        last_wall = wall
        if probe_now:  # the gradient noise scale's two norms, on the global model (not timed in the round)
            k = (r + 1) // cfg.noise_every
            x, y = next(iter(train_data.calibration_batches(1, first=k * sync.size + sync.rank)))
            probe = probe_noise(model, x, y, method.eval_scale(), sync)
            writer.add_noise(r, epoch, probe.small_batch, probe.big_batch, probe.small_sq, probe.big_sq)
        if evaluate_now:
            loss, acc, top5 = evaluate_model()
            result.final_loss, result.final_accuracy, result.final_top5 = loss, acc, top5
            writer.add_eval(r, epoch, time.perf_counter() - t0, loss, acc, top5)
            log(
                f"round {r + 1}/{n_rounds} epoch {epoch:.2f} train loss {stats.loss:.4f} "
                f"test loss {loss:.4f} test accuracy {acc:.2f}% (top-5 {top5:.2f}%)"
            )
        scaler_states = precision.gather_state(sync) if checkpoint_now else None  # collective
        method_state = method.state_dict() if checkpoint_now else None  # collective
        if checkpoint_now and save_checkpoint is not None:
            writer.guard(
                save_checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict() if method.keeps_optimizer_state else None,
                    "method": method_state,
                    "precision": scaler_states,
                    "round": r + 1,
                    "wall_s": time.perf_counter() - t0,
                    "identity": identity,
                    "config": cfg.as_dict(),
                },
            )
        # Ranks agree on rank 0's writes, so a full disk ends every rank, none waits.
        if sync.any_over_world(writer.error is not None):
            raise CollectiveError(str(writer.error) if writer.error else "rank 0 could not write its files")
        if stop_now and not final:
            result.stopped_early = True
            log(
                f"stopping at round {r + 1} on a signal or --stop-after-rounds; checkpoint written, resume with --resume"
            )
            break
    result.wall_s = time.perf_counter() - t0
    return result
