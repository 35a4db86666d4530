"""The round loop: one optimisation step at a time, in rounds (`rounds.round_starts`).

The loop is a client of the public API's session (`api.Training`, the machinery of `hist.IST`):
the session's optimizer hooks synchronise gradients and end each round at its last step through
the method the options name. The loop times data, compute and synchronisation, decides at each
round's end (agreeing with the other ranks on stops and divergence) whether every rank needs the
whole model, evaluates it, asks for checkpoints, agrees on failed writes, and hands each round's
figures to its observers. It knows neither HDF5 nor a method's internals.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..api import RoundEndChoice, Training
from ..comm import Synchroniser
from ..config import Config
from ..data import DeviceLoader
from ..errors import CollectiveError, HistError
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


@dataclass
class RoundEnd:
    """What every rank agreed on at a round's end, from one allreduce."""

    stop: bool  # a stop was requested on some rank (signal, --stop-after-rounds)
    diverged: list[int]  # ranks whose round loss is not finite
    data_s: list[float]  # every rank's data seconds so far (for the method's `observe_round`)
    compute_s: list[float]  # every rank's compute seconds so far

    @classmethod
    def agree(cls, sync: Synchroniser, stop: bool, loss: float, so_far: dict) -> RoundEnd:
        n, mine = sync.size, [i == sync.rank for i in range(sync.size)]
        summed = sync.sum_over_world(
            [float(stop)]
            + [float(m and not math.isfinite(loss)) for m in mine]
            + [so_far.get("data", 0.0) * m for m in mine]
            + [so_far.get("compute", 0.0) * m for m in mine]
        )
        return cls(
            stop=summed[0] > 0,
            diverged=[i for i in range(n) if summed[1 + i] > 0],
            data_s=list(summed[1 + n : 1 + 2 * n]),
            compute_s=list(summed[1 + 2 * n : 1 + 3 * n]),
        )


@dataclass
class RoundReport:
    """One round's figures, made once and handed to every observer (rank 0)."""

    round: int  # 0-based
    steps: int
    epoch: float
    wall_s: float  # since the run began
    round_s: float  # wall time of this round, evaluations of the previous one included
    per_rank: dict  # each RoundStats field: a list over ranks
    lr: float
    blocks: list[int] | None  # partitioned blocks per subnetwork (None: the full model)
    images: int  # all ranks

    @property
    def phase_sums(self) -> dict:
        return {k: float(sum(self.per_rank[f"{k}_s"])) for k in ("data", "compute", "sync")}

    @property
    def mean_loss(self) -> float:
        return sum(self.per_rank["loss"]) / len(self.per_rank["loss"])


def round_observers(writer: GuardedWriter, totals: dict, progress) -> list:
    """Where a round's report goes: the timing file (and TensorBoard), the totals the end-of-run
    block reads, the progress lines."""

    def record(rep: RoundReport) -> None:
        writer.add_round(rep.round, rep.steps, rep.epoch, rep.wall_s, rep.per_rank, lr=rep.lr, blocks=rep.blocks)

    def add_up(rep: RoundReport) -> None:
        size = len(rep.per_rank["loss"])
        totals["images"] += rep.images
        totals["rounds"] += 1
        totals["busy_s"] += sum(rep.phase_sums.values()) / size
        totals["sync_s"] += rep.phase_sums["sync"] / size
        totals["bytes"] += sum(rep.per_rank["bytes_sent"])

    def show(rep: RoundReport) -> None:
        progress.update(
            rep.round + 1, rep.epoch, rep.wall_s, rep.round_s, rep.mean_loss, rep.lr, rep.images, rep.phase_sums
        )

    return [record, add_up] + ([show] if progress is not None else [])


class Run:
    """A run's rounds, one phase to a function: train a round's steps (the session ends the round
    at its last step, after `round_end` decided), report, then evaluate, probe and checkpoint as
    the options ask."""

    def __init__(self, cfg, model, optimizer, sync, train_data, test_data, peak, recorder, save_checkpoint, log,
                 stop, identity, progress, warm_rounds=0):  # fmt: skip
        self.cfg, self.model, self.sync = cfg, model, sync
        self.train_data, self.test_data, self.peak = train_data, test_data, peak
        self.save_checkpoint, self.log, self.identity = save_checkpoint, log, identity
        self.device = next(model.parameters()).device
        self.stop = stop or StopFlag(cfg.stop_signal)
        self.steps_per_epoch = train_data.steps_per_epoch
        self.starts = round_starts(cfg, self.steps_per_epoch, peak)
        self.total_steps, self.n_rounds = self.starts[-1], len(self.starts) - 1
        self.precision = Precision(cfg.precision, self.device)
        self.clock = PhaseClock(self.device)
        self.session = Training(model, optimizer, cfg, sync, round_starts=self.starts, on_round_end=self.round_end,
                                clock=self.clock, scaler=self.precision.scaler, warm_rounds=warm_rounds)  # fmt: skip
        self.step = TrainStep(model, self.session, self.precision, self.clock)
        self.stats = RoundStats()  # the round being trained
        self.agreed: RoundEnd | None = None  # what the ranks agreed at its end
        self.due_now: dict = {}  # what its end must do besides aggregating
        self.writer = GuardedWriter(recorder)
        self.result = Result(self.n_rounds, None, None, 0.0)
        watched = recorder is not None or progress is not None
        self.observers = round_observers(self.writer, self.result.totals, progress) if watched else []
        self.t0 = time.perf_counter()  # restarted by `begin`

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def begin(self, resume_state: dict | None) -> int:
        """The round to start from: a checkpoint's, or 0 with every rank holding rank 0's model.
        The run's clock starts here, carrying on from a checkpoint's wall time."""
        start_round, wall_before = 0, 0.0
        if resume_state is not None:  # (every rank already holds rank 0's model: the session's start)
            self.session.load_state_dict(resume_state)
            start_round, wall_before = resume_state["round"], resume_state["wall_s"]
            self.log(f"resuming from the checkpoint at round {start_round}")
        self.t0 = time.perf_counter() - wall_before
        return start_round

    def evaluate_model(self):
        cfg = self.cfg
        with self.precision.autocast():
            # BatchNorm calibration batches are made afresh each time (at 224 pixels, keeping
            # them would hold bn_batches full batches on the device for the whole run).
            calibration = self.train_data.calibration_batches(cfg.bn_batches)
            with self.session.full_model():
                return evaluate(self.model, self.test_data, calibration, self.sync, self.session.eval_scale,
                                cfg.eval_batch_size, cfg.eval_bn)  # fmt: skip

    def train_round(self, r: int) -> None:
        """Round r's steps; its last one ends the round in the session (after `round_end`)."""
        for step in range(self.starts[r], self.starts[r + 1]):
            x, y = self.train_data.batch(step)
            self.clock.lap("data")
            self.step.set_lr(lr_at(step, self.total_steps, self.steps_per_epoch, self.cfg, self.peak))
            self.step(x, y)

    def round_end(self, r: int) -> RoundEndChoice:
        """At round r's last step, before anything is aggregated: the mean loss (read once a
        round, not once a step), the ranks' agreement on a stop or a diverged loss (raised here,
        so nothing of the round is kept), and whether the end must give every rank the whole model."""
        self.stats.loss = self.step.take_loss() / (self.starts[r + 1] - self.starts[r])
        end = self.agreed = RoundEnd.agree(self.sync, self.stop.raised, self.stats.loss, self.clock.read())
        if end.diverged:
            raise self.diverged(r, end.diverged)
        due = self.due_now = self.due(r, end.stop)
        full = due["evaluate"] or due["checkpoint"] or due["probe"]
        return RoundEndChoice(full, due["stop_only"], end.data_s, end.compute_s)

    def due(self, r: int, stop: bool) -> dict:
        """What round r's end must do besides aggregating: evaluate, checkpoint, probe the noise."""
        cfg, first, last = self.cfg, self.starts[r], self.starts[r + 1]
        final = r == self.n_rounds - 1
        evaluate_now = (
            final
            or (cfg.eval_every and (r + 1) % cfg.eval_every == 0)
            or (
                cfg.eval_every_epochs
                and math.floor(last / self.steps_per_epoch / cfg.eval_every_epochs)
                > math.floor(first / self.steps_per_epoch / cfg.eval_every_epochs)
            )
        )
        scheduled = cfg.checkpoint_every and (r + 1) % cfg.checkpoint_every == 0
        checkpoint_now = stop or final or scheduled
        probe_now = cfg.noise_every and (r + 1) % cfg.noise_every == 0
        # a full synchronisation for the stop alone: a run resumed from it goes on as if it had not been
        stop_only = stop and not (evaluate_now or probe_now or scheduled)
        return {"final": final, "evaluate": bool(evaluate_now), "checkpoint": bool(checkpoint_now),
                "probe": bool(probe_now), "stop_only": bool(stop_only)}  # fmt: skip

    def report(self, r: int, stats: RoundStats, round_s: float, wall: float) -> None:
        """Gather every rank's figures (a collective) and hand rank 0's report to the observers."""
        gathered = self.sync.gather(stats)
        if not self.observers:
            return
        steps = self.starts[r + 1] - self.starts[r]
        per_rank = {k: [getattr(s, k) for s in gathered] for k in RoundStats.__dataclass_fields__}
        rep = RoundReport(r, steps, self.starts[r + 1] / self.steps_per_epoch, wall, round_s, per_rank, self.step.lr,
                          self.session.blocks_per_subnet, steps * self.cfg.batch_size * self.sync.size)  # fmt: skip
        for observe in self.observers:
            observe(rep)

    def probe(self, r: int) -> None:
        """The gradient noise scale's two norms, on the global model (not timed in the round)."""
        k = (r + 1) // self.cfg.noise_every
        x, y = next(iter(self.train_data.calibration_batches(1, first=k * self.sync.size + self.sync.rank)))
        with self.session.full_model():
            probe = probe_noise(self.model, x, y, self.session.eval_scale, self.sync)
        epoch = self.starts[r + 1] / self.steps_per_epoch
        self.writer.add_noise(r, epoch, probe.small_batch, probe.big_batch, probe.small_sq, probe.big_sq)

    def evaluation(self, r: int, train_loss: float) -> None:
        loss, acc, top5 = self.evaluate_model()
        self.result.final_loss, self.result.final_accuracy, self.result.final_top5 = loss, acc, top5
        epoch = self.starts[r + 1] / self.steps_per_epoch
        self.writer.add_eval(r, epoch, self.elapsed(), loss, acc, top5)
        self.log(
            f"round {r + 1}/{self.n_rounds} epoch {epoch:.2f} train loss {train_loss:.4f} "
            f"test loss {loss:.4f} test accuracy {acc:.2f}% (top-5 {top5:.2f}%)"
        )

    def checkpoint(self, r: int, now: bool) -> None:
        """The session's state (collective: every rank's scaler and residuals are gathered), with
        the run's own: the round to resume at, the wall time so far, what must match to resume."""
        if not now:
            return
        state = self.session.state_dict()
        if self.save_checkpoint is not None:
            run = {"round": r + 1, "wall_s": self.elapsed(), "identity": self.identity, "config": self.cfg.as_dict()}
            self.writer.guard(self.save_checkpoint, {**state, **run})

    def diverged(self, r: int, ranks: list[int]) -> CollectiveError:
        self.writer.finish("diverged", self.elapsed())
        return CollectiveError(
            f"training diverged in round {r + 1} (epoch {self.starts[r + 1] / self.steps_per_epoch:.2f}): the loss on "
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} is not finite; "
            f"nothing of this round was kept (the timing file has the good rounds, status 'diverged'"
            f", the last checkpoint, if any, is unchanged); "
            f"try a lower --lr or a --warmup-epochs of 1 or more"
        )

    def run(self, start_round: int) -> Result:
        result, clock, sync = self.result, self.clock, self.sync
        if start_round >= self.n_rounds:  # resuming a run that had finished: report its model again
            result.final_loss, result.final_accuracy, result.final_top5 = self.evaluate_model()
            self.log(f"the checkpoint is already at the last round ({self.n_rounds}); nothing left to train")
        last_wall = self.elapsed()
        for r in range(start_round, self.n_rounds):
            stats = self.stats = RoundStats()
            sync.traffic.take()  # the round's byte count starts at zero
            clock.start()
            self.session.begin_round()  # its plan and subnetwork (timed as sync)
            clock.lap("sync")
            self.train_round(r)  # ...and its end: `round_end`, then the aggregation (timed as sync)
            end, due = self.agreed, self.due_now
            phases = clock.read()
            stats.data_s, stats.compute_s, stats.sync_s = (phases.get(k, 0.0) for k in ("data", "compute", "sync"))
            stats.bytes_sent, stats.bytes_received = (int(v) for v in sync.traffic.take())
            wall = self.elapsed()
            self.report(r, stats, wall - last_wall, wall)
            last_wall = wall
            if due["probe"]:
                self.probe(r)
            if due["evaluate"]:
                self.evaluation(r, stats.loss)
            self.checkpoint(r, due["checkpoint"])
            # Ranks agree on rank 0's writes, so a full disk ends every rank, none waits.
            if sync.any_over_world(self.writer.error is not None):
                raise CollectiveError(
                    str(self.writer.error) if self.writer.error else "rank 0 could not write its files"
                )
            if end.stop and not due["final"]:
                result.stopped_early = True
                self.log(
                    f"stopping at round {r + 1} on a signal or --stop-after-rounds; checkpoint written, resume with --resume"
                )
                break
        result.wall_s = self.elapsed()
        return result


def train(
    cfg: Config,
    model: PreActResNet,
    optimizer: torch.optim.Optimizer,
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
    warm_rounds: int = 0,
) -> Result:
    """Run rounds until the epochs are done or a stop is requested; returns the final figures.

    `recorder` (rank 0 only) receives add_round/add_eval/finish, `save_checkpoint` (rank 0
    only) a checkpoint's state, `progress` (rank 0 only, `engine.progress.Progress`) each
    round's figures for the log; all None elsewhere. `warm_rounds`: rounds of local SGD before
    IST starts (--warmup-local-sgd-epochs).
    """
    run = Run(cfg, model, optimizer, sync, train_data, test_data, peak, recorder, save_checkpoint, log, stop, identity,
              progress, warm_rounds)  # fmt: skip
    try:
        return run.run(run.begin(resume_state))
    finally:
        run.session.close()
