"""hist.IST and hist.LocalSGD: IST (or local SGD) in the user's own training loop.

Rounds follow the optimizer's steps (`register_step_post_hook`): the last step of a round
aggregates, draws the next plan and moves the blocks, all through hist's own methods
(`methods.IST`, `methods.LocalSGD`, or `methods.Method` for one process) and synchronisers
(`comm.connect`), so the user's loop, model and data stay theirs. The engine, the ranks and the
subnetworks come from the launcher (`world`): horovodrun or mpirun -> Horovod + MPI, torchrun ->
torch.distributed, one process -> neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref

import torch
from torch import nn

from ..choices import (
    AGGREGATES,
    BACKENDS,
    BLOCK_PRECISIONS,
    OPTIMIZER_STATES,
    ROUND_SCHEDULES,
    SHARED_PRECISIONS,
    TEST_SCALES,
)
from ..errors import ArgumentTypeError, BlockError, OptionError
from .blocks import Switch, Switchboard, check_parameters, resolve_blocks

# One synchroniser per engine and process: Horovod and torch.distributed start once.
_SYNCS: dict[str, object] = {}
# The hist.IST or hist.LocalSGD each optimizer drives, by id(optimizer).
_SESSIONS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _watch_grad_scalers() -> None:
    """Teach torch's GradScaler (once per process) to tell hist about the optimizers it drives;
    any other optimizer sees the scaler unchanged. A step the scaler skips (infinite gradients)
    calls no optimizer hook, so without this the ranks would count different rounds; and a
    subnetwork's ranks must average their gradients before the scaler looks for infinities, so
    that they skip together."""
    cls = torch.amp.GradScaler
    if cls.__dict__.get("_hist_watched"):
        return
    unscale, update = cls.unscale_, cls.update

    def unscale_(self, optimizer):
        run = _SESSIONS.get(id(optimizer))
        if run is not None and self.is_enabled():
            run.scaler = run.scaler or self
            run._before_step()
        return unscale(self, optimizer)

    def update_(self, new_scale=None):
        runs = [_SESSIONS.get(key) for key in list(self._per_optimizer_states)] if self.is_enabled() else []
        out = update(self, new_scale)
        for run in runs:
            if run is not None and run.scaler is self:
                run._after_update()
        return out

    functools.update_wrapper(unscale_, unscale)
    functools.update_wrapper(update_, update)
    cls.unscale_, cls.update, cls._hist_watched = unscale_, update_, True


def _connect(who: str, subnets: int | None, backend: str, device: torch.device, block_transport: str):
    """This process's synchroniser for the launcher's engine (`world.resolve_engine`), started once;
    `subnets` None (local SGD): any count will do."""
    from ..comm import connect
    from ..world import resolve_engine, world_info_from_env

    size = world_info_from_env().size
    engine = resolve_engine(backend, size)
    sync = _SYNCS.get(engine)
    if sync is None:
        sync = _SYNCS[engine] = connect(subnets or size, size, engine, device=device, block_transport=block_transport)
    elif subnets is not None and sync.subnets != subnets:
        raise OptionError(
            f"{who}: subnets={subnets}, but this process already formed {sync.subnets} subnetworks for an "
            f"earlier hist.IST; one subnetwork count per process"
        )
    return sync


def _one_of(who: str, name: str, value, choices) -> None:
    if value not in choices:
        raise OptionError(f"{who}: {name}={value!r}; choose one of {', '.join(map(repr, choices))}")


def _check(who: str, ok: bool, message: str) -> None:
    if not ok:
        raise OptionError(f"{who}: {message}")


def _world_size() -> int:
    from ..world import world_info_from_env

    return world_info_from_env().size


@dataclasses.dataclass
class RoundEndChoice:
    """What a deferring session's caller decides at a round's last step, before aggregation."""

    full: bool = False  # every rank needs the whole model after this round (evaluation, checkpoint)
    stop_only: bool = False  # ...only because the run stops here (a resumed run goes on as if not)
    data_s: list[float] | None = None  # every rank's data seconds so far (--balance speed reads them)
    compute_s: list[float] | None = None  # every rank's compute seconds so far


def _switches_itself(model, modules, trained) -> bool:
    """hist's own ResNet with its own partitioned blocks and every parameter trained: the methods
    then train through the model itself, which offers the Switchboard's interface."""
    from ..models import PreActResNet

    return (
        isinstance(model, PreActResNet)
        and [id(b) for b in modules] == [id(b) for b in model.partitioned_blocks()]
        and {id(p) for p in trained} == {id(p) for p in model.parameters()}
    )


class _Rounds:
    """What IST and local SGD share: rounds that follow the optimizer, a full model on demand,
    and a state for an exact resume."""

    who = "hist"
    kind = ""

    def _setup(
        self,
        model,
        blocks,
        optimizer,
        *,
        local_iters,
        subnets,
        aggregate,
        optimizer_state,
        outer_lr,
        outer_momentum,
        min_depth,
        shared_precision,
        shared_topk,
        block_precision,
        balance,
        round_schedule,
        qsr_alpha,
        post_local_steps,
        warmup_local_sgd_rounds,
        test_scale,
        overlap,
        plan_check_every,
        seed,
        scaler,
        backend,
        block_transport,
        sync,
    ):
        who = self.who
        if blocks is not None or self.kind == "ist":
            modules, names = resolve_blocks(who, model, blocks)
        else:
            if not isinstance(model, nn.Module):
                raise ArgumentTypeError(f"{who}: model must be a torch.nn.Module, not {type(model).__name__}")
            modules, names = [], {}
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError(f"{who}: optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
        if _SESSIONS.get(id(optimizer)) is not None:
            raise OptionError(
                f"{who}: this optimizer already drives a {_SESSIONS[id(optimizer)].who}; close() it first"
            )
        for name, value in (("local_iters", local_iters), ("subnets", subnets), ("min_depth", min_depth)):
            _check(who, isinstance(value, int) and not isinstance(value, bool), f"{name}={value!r} must be an int")
        _check(who, local_iters >= 1, f"local_iters={local_iters} must be at least 1")
        _check(who, subnets >= 0, f"subnets={subnets} must be at least 1 (0 = one per process)")
        _one_of(who, "aggregate", aggregate, AGGREGATES)
        _one_of(who, "optimizer_state", optimizer_state, OPTIMIZER_STATES)
        _one_of(who, "shared_precision", shared_precision, SHARED_PRECISIONS)
        _one_of(who, "block_precision", block_precision, BLOCK_PRECISIONS)
        _check(
            who, 0 <= shared_topk < 1, f"shared_topk={shared_topk} must be a fraction in [0, 1) (0 sends every value)"
        )
        _check(
            who,
            block_precision == "fp32" or aggregate == "copy",
            f"block_precision={block_precision!r} delivers each block from its one owner: it needs aggregate='copy'",
        )
        _one_of(who, "round_schedule", round_schedule, ROUND_SCHEDULES)
        _one_of(who, "backend", backend, BACKENDS)
        _one_of(who, "test_scale", test_scale, TEST_SCALES)
        _check(
            who,
            balance == "none",
            f"balance={balance!r} is not carried by the API yet (hist-train --balance speed has it); leave balance='none'",
        )
        _check(who, outer_lr > 0, f"outer_lr={outer_lr} must be positive")
        _check(who, 0 <= outer_momentum < 1, f"outer_momentum={outer_momentum} must be in [0, 1)")
        _check(who, qsr_alpha > 0, f"qsr_alpha={qsr_alpha} must be positive")
        _check(
            who,
            round_schedule != "post-local" or (post_local_steps is not None and post_local_steps >= 0),
            "round_schedule='post-local' needs post_local_steps=N (one-step rounds until step N)",
        )
        _check(who, warmup_local_sgd_rounds >= 0, f"warmup_local_sgd_rounds={warmup_local_sgd_rounds} is negative")
        _check(who, plan_check_every >= 1, f"plan_check_every={plan_check_every} must be at least 1")
        if optimizer_state == "average" and not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
            raise ArgumentTypeError(
                f"{who}: optimizer_state='average' aggregates the state of SGD, Adam and AdamW, not "
                f"{type(optimizer).__name__}'s; pass optimizer_state='restart'"
            )
        if scaler is not None and not (hasattr(scaler, "unscale_") and hasattr(scaler, "update")):
            raise ArgumentTypeError(f"{who}: scaler must be a torch.amp.GradScaler, not {type(scaler).__name__}")
        trained = check_parameters(who, model, modules, names, optimizer)
        n = len(modules)
        if self.kind == "ist":
            size = sync.size if sync is not None else _world_size()
            s = subnets or size
            if s > n:
                how = " (one per process)" if not subnets else ""
                raise BlockError(
                    f"{who}: {s} subnetworks{how} but {n} block{'s' if n != 1 else ''} "
                    f"({type(model).__name__}); each subnetwork needs a block of its own: pass more blocks "
                    f"or subnets={max(1, n)} or fewer"
                )
            _check(who, size % s == 0, f"{size} processes cannot form {s} equal subnetworks; launch a multiple of {s}")
            _check(who, 0 <= min_depth <= n, f"min_depth={min_depth} must be between 0 and the {n} blocks")
        device = trained[0].device if trained else torch.device("cpu")
        if sync is None:
            sync = _connect(who, s if self.kind == "ist" else None, backend, device, block_transport)

        from ..config import Config

        cfg = dataclasses.replace(
            Config(),
            method="ist" if self.kind == "ist" else "local-sgd",
            subnets=s if self.kind == "ist" else sync.subnets,
            min_depth=min_depth,
            aggregate=aggregate,
            optimizer_state=optimizer_state,
            outer_lr=float(outer_lr),
            outer_momentum=float(outer_momentum),
            shared_precision=shared_precision,
            shared_topk=float(shared_topk),
            block_precision=block_precision,
            local_iters=local_iters,
            round_schedule=round_schedule,
            qsr_alpha=float(qsr_alpha),
            overlap=bool(overlap),
            plan_check_every=plan_check_every,
            seed=seed,
            test_scale=test_scale,
        )
        self._build(model, modules, names, trained, optimizer, cfg, sync, scaler, warmup_local_sgd_rounds)
        self.post_local_steps = post_local_steps or 0
        self._begin()

    def _build(self, model, modules, names, trained, optimizer, cfg, sync, scaler, warm_rounds, *,
               round_starts=None, on_round_end=None, clock=None) -> None:  # fmt: skip
        """The session over checked arguments: switches, the method (by `cfg.method`; one process
        trains the full model), every rank on rank 0's weights, the optimizer's hooks."""
        from ..methods import METHOD_CLASSES, Method

        self.switches = [  # the model is changed only once nothing can refuse it
            Switch(self.who, i, f"{names.get(id(b)) or 'the model itself'}, {type(b).__name__}", b)
            for i, b in enumerate(modules)
        ]
        self.model, self.scaler, self.sync, self.cfg = model, scaler, sync, cfg
        self.board = model if _switches_itself(model, modules, trained) else Switchboard(model, self.switches, trained)
        self.test_scale = cfg.test_scale
        self.post_local_steps = 0
        self.round_starts, self.on_round_end, self.clock = round_starts, on_round_end, clock
        cls = METHOD_CLASSES[cfg.method] if sync.size > 1 else Method
        self.method = cls(self.board, sync, cfg, optimizer, warm_rounds)
        # The optimizer that steps: Horovod's data parallel wraps the one given in its own.
        self.optimizer = self.method.optimizer
        self.sync.broadcast_model(model)  # every rank starts from rank 0's weights
        self.step = 0  # optimizer steps (with a scaler: iterations, skipped steps included)
        self.round = 0
        self.round_end = 0
        self._fresh = True  # no step since the last aggregation
        self._full_end = False  # the last round's end gave every rank the whole model
        self._cut = False  # aggregated mid-round: the rest of the round begins on leaving
        self._pending = False  # a round ended; the next begins at `begin_round` (deferring sessions)
        self._trained_plan = None  # the plan of the steps before the last aggregation
        self._stepped = False
        self._grads_ready = False
        self._hooks = [
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
            model.register_forward_pre_hook(self._probe, with_kwargs=True),
        ]
        _SESSIONS[id(self.optimizer)] = self
        _watch_grad_scalers()

    # ------------------------------------------------------------ who
    @property
    def rank(self) -> int:
        return self.sync.rank

    @property
    def size(self) -> int:
        return self.sync.size

    @property
    def engine(self) -> str:
        """The engine: horovod, torch or local (one process)."""
        return self.sync.engine

    @property
    def blocks_per_subnet(self) -> list[int] | None:
        """Partitioned blocks each subnetwork trained in the last round (None: the full model)."""
        return self.method.blocks_per_subnet()

    def optimizer_step(self, step_fn=None) -> None:
        """The optimizer's step as the method takes it (Horovod's data parallel skips its own
        synchronisation there); `step_fn(optimizer)` replaces `optimizer.step()` (a scaler's step)."""
        self.method.step(step_fn)

    @property
    def eval_scale(self) -> float:
        """The residual scale of the blocks in the full model (1/S for IST at S subnetworks)."""
        return self.method.eval_scale() if self.test_scale == "auto" else 1.0

    # ------------------------------------------------------------ rounds
    def _round_length(self) -> int:
        from ..methods.rounds import length_of_round

        if self.round_starts is not None:
            return self.round_starts[self.round + 1] - self.step
        lr = self.optimizer.param_groups[0]["lr"]
        if self.cfg.round_schedule == "qsr" and not lr > 0:
            return self.cfg.local_iters
        return length_of_round(
            self.cfg.round_schedule, self.step, self.cfg.local_iters, lr, self.cfg.qsr_alpha, self.post_local_steps
        )

    # A session that defers (hist-train's) begins each round when its caller says, inside the
    # round's own accounting (its plan check is the round's traffic, its time the round's sync);
    # the others begin the next round at the last step of the one before.
    defers = False

    def _begin(self) -> None:
        """Round `self.round` begins at step `self.step`: its length, its plan, its subnetwork."""
        self._pending = False
        self._round_began = self.step
        self.round_end = self.step + self._round_length()
        self.method.begin_round(self.round)

    def begin_round(self) -> None:
        """Begin the round that is due (a deferring session's caller, at each round's start)."""
        if self._pending:
            self._begin()

    def _before_step(self, optimizer=None, args=None, kwargs=None) -> None:
        """Before the optimizer reads the gradients (with a scaler: before it unscales them): the
        inactive blocks' gradients are dropped and the subnetwork's ranks average theirs."""
        if self._grads_ready:
            return
        for p in self.board.inactive_params():
            p.grad = None
        if self.clock is not None:
            self.clock.lap("compute")
        self.method.after_backward()
        if self.clock is not None:
            self.clock.lap("sync")
        self._grads_ready = True

    def _after_step(self, optimizer=None, args=None, kwargs=None) -> None:
        if not self._grads_ready:  # the same step seen again: Horovod's optimizer class wraps torch's step twice
            return
        self._stepped = True
        self._grads_ready = False
        self._advance()

    def _advance(self) -> None:
        self.step += 1
        self._fresh = False
        if self.step >= self.round_end:
            if self.clock is not None:
                self.clock.lap("compute")
            # The caller's decision comes before anything is aggregated: it may end the run
            # (a diverged loss raises) or ask for the whole model on every rank.
            end = self.on_round_end(self.round) if self.on_round_end is not None else RoundEndChoice()
            if end.data_s is not None:
                self.method.observe_round(self.step - self._round_began, end.data_s, end.compute_s)
            with torch.no_grad():
                self._trained_plan = getattr(self.method, "plan", None)
                self.method.end_round(self.round, full=end.full, stop_only=end.stop_only)
                self._settle_steps()
            if self.clock is not None:
                self.clock.lap("sync")
            self._full_end = end.full
            self.round += 1
            self._fresh = True
            if self.defers:
                self._pending = True
            else:
                self._begin()

    def _after_update(self) -> None:
        """The GradScaler's update ends an iteration: a step it skipped called no optimizer hook,
        so it is counted here (every rank then ends its rounds at the same batch)."""
        if not self._stepped:
            self._grads_ready = False
            self._advance()
        self._stepped = False

    def _settle_steps(self) -> None:
        """Adam's step count after an aggregation: every block is trained in every round by some
        subnetwork, so each parameter's count is the run's (this rank's largest)."""
        if self.sync.size == 1 or not isinstance(self.optimizer, torch.optim.Adam):
            return
        steps = [st["step"] for st in self.optimizer.state.values() if torch.is_tensor(st.get("step"))]
        if steps:
            top = max(float(t) for t in steps)
            for t in steps:
                t.fill_(top)

    def _probe(self, module, args, kwargs):
        """At the model's first forward: once more with every block on, in eval mode and without
        gradients, so each block's shape is checked before a switched-off one could hide it."""
        self._hooks[2].remove()
        if all(s.checked for s in self.switches):
            return None
        modes = [(m, m.training) for m in self.model.modules()]
        states = [(s.active, s.scale) for s in self.switches]
        try:
            self.board.set_full(1.0)
            self.model.eval()
            with torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training
            for s, (active, scale) in zip(self.switches, states):
                s.active, s.scale = active, scale
        return None

    # ------------------------------------------------------------ the full model
    @torch.no_grad()
    def _synchronise(self) -> None:
        """Every rank gets the aggregated model (collective). Right after a round's end only the
        blocks travel, from the ranks that hold them; mid-round the round is cut there: it
        aggregates, and the rest of the round begins on leaving (`_resume`)."""
        if self.sync.size == 1:
            return
        plan = getattr(self.method, "plan", None)
        if self._fresh:
            if plan is not None and not self._full_end:  # each block from its holder, to everyone
                travelling = [self.method.carried(ps, outer=True) for ps in self.method.blocks]
                self.sync.sync_blocks(travelling, plan, None, "copy")
            trained = self._trained_plan
        else:
            self.method.end_round(self.round, full=True)
            self._settle_steps()
            self._cut, self._fresh, trained = True, True, plan
            self._trained_plan = plan
        if self.step:
            self._sync_buffers(trained)

    def _sync_buffers(self, plan) -> None:
        """Floating-point buffers (BatchNorm's running statistics): a block's from the ranks that
        trained it last (their mean, when a subnetwork has several), the others averaged over
        every rank. Training never reads them."""
        in_blocks = [[b for b in s.module.buffers() if b.is_floating_point()] for s in self.switches]
        ids = {id(b) for bs in in_blocks for b in bs}
        shared = [b for b in self.model.buffers() if b.is_floating_point() and id(b) not in ids]
        if plan is not None and any(in_blocks):
            like = next(b for bs in in_blocks for b in bs)
            travelling = [bs or [torch.zeros(1, dtype=like.dtype, device=like.device)] for bs in in_blocks]
            self.sync.sync_blocks(travelling, plan, None, "copy")  # column j from the owner's j-th rank
        if plan is None or self.sync.ranks_per_subnet > 1:  # then the mean of the owner's ranks
            shared += [b for bs in in_blocks for b in bs]
        if shared:
            self.sync.average_over_world(shared)

    def _resume(self) -> None:
        """Training goes on: the rest of a cut round begins (its plan, its start)."""
        if self._cut:
            self._cut = False
            self.method.begin_round(self.round)

    @contextlib.contextmanager
    def full_model(self, calibration=None):
        """`with ist.full_model():` every rank holds the aggregated model, its blocks' residual
        branches scaled by their probability of being trained (`eval_scale`), for evaluation;
        on leaving, training goes on as before (each module's train/eval mode included).

        Collective: every rank enters at the same step. `calibration`, an iterable of input
        batches (or (input, target) pairs), recomputes BatchNorm's statistics for the full model
        on them, averaged over the ranks."""
        modes = [(m, m.training) for m in self.model.modules()]
        states = [(s.active, s.scale) for s in self.switches]
        self._synchronise()
        try:
            self.board.set_full(self.eval_scale)
            if calibration is not None:
                self._recalibrate(calibration)
            yield self.model
        finally:
            for m, training in modes:
                m.training = training
            if self._cut:
                self._resume()
            else:
                for s, (active, scale) in zip(self.switches, states):
                    s.active, s.scale = active, scale

    @torch.no_grad()
    def _recalibrate(self, batches) -> None:
        from ..models import recalibrate_batchnorm

        recalibrate_batchnorm(self.model, ((b[0] if isinstance(b, (tuple, list)) else b, None) for b in batches))
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        stats = [t for m in norms for t in (m.running_mean, m.running_var) if t is not None]
        if stats and self.sync.size > 1:
            self.sync.average_over_world(stats)

    # ------------------------------------------------------------ exact resume
    def state_dict(self) -> dict:
        """Everything an exact resume needs, the same on every rank: the aggregated model, the
        optimizer (its state aggregated, or restarted), hist's rounds and method state, and every
        rank's GradScaler. Collective: every rank calls it at the same step; mid-round it
        aggregates there, as `full_model` does. Save it from one rank (torch.save)."""
        with torch.no_grad():
            self._synchronise()
        self._resume()
        states = None
        if self.scaler is not None:
            states = self.sync.allgather(self.scaler.state_dict())
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "hist": {
                "kind": self.kind,
                "world_size": self.sync.size,
                "subnets": self.sync.subnets if self.kind == "ist" else None,
                "blocks": len(self.switches),
                "step": self.step,
                "round": self.round,
                "round_end": self.round_end,
                "method": self.method.state_dict(),
                "scaler": states,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output (every rank loads the same)."""
        h = state.get("hist") if isinstance(state, dict) else None
        if h is None:
            raise OptionError(f"{self.who}: load_state_dict takes what state_dict() returned (model, optimizer, hist)")
        mine = (self.kind, self.sync.size, self.sync.subnets if self.kind == "ist" else None, len(self.switches))
        saved = (h["kind"], h["world_size"], h["subnets"], h["blocks"])
        if mine != saved:
            raise OptionError(
                f"{self.who}: the state is of {saved[0]} at {saved[1]} processes, {saved[2]} subnetworks, "
                f"{saved[3]} blocks; this run is {mine[0]} at {mine[1]}, {mine[2]}, {mine[3]}"
            )
        self.model.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(h["method"] or {})
        if self.scaler is not None and h.get("scaler"):
            self.scaler.load_state_dict(h["scaler"][self.sync.rank])
        self.step, self.round = h["step"], h["round"]
        self._fresh, self._cut, self._full_end = True, False, False
        if self.defers:
            self._pending = True
        else:
            self._begin()
            self.round_end = h["round_end"]
        self._trained_plan = getattr(self.method, "plan", None)

    # ------------------------------------------------------------ the end
    def close(self) -> None:
        """Remove hist's hooks and give every block its own forward back (all blocks on)."""
        for h in self._hooks:
            h.remove()
        for s in self.switches:
            s.restore()
        if _SESSIONS.get(id(self.optimizer)) is self:
            del _SESSIONS[id(self.optimizer)]


class IST(_Rounds):
    """Independent subnetwork training in your own loop.

    ``ist = hist.IST(model, blocks, optimizer, local_iters=50)``, then the loop as it was
    (forward, backward, ``optimizer.step()``); ``with ist.full_model():`` to evaluate. `blocks`
    are the residual modules IST partitions (each computes x + f(x) and keeps its input's shape);
    everything else is shared. docs/api.md has the contract and every keyword.
    """

    who = "hist.IST"
    kind = "ist"

    def __init__(
        self,
        model: nn.Module,
        blocks,
        optimizer: torch.optim.Optimizer,
        local_iters: int = 50,
        *,
        subnets: int = 0,
        aggregate: str = "copy",
        optimizer_state: str = "average",
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        min_depth: int = 0,
        shared_precision: str = "fp32",
        shared_topk: float = 0.0,
        block_precision: str = "fp32",
        balance: str = "none",
        round_schedule: str = "constant",
        qsr_alpha: float = 0.1,
        post_local_steps: int | None = None,
        warmup_local_sgd_rounds: int = 0,
        test_scale: str = "auto",
        overlap: bool = True,
        plan_check_every: int = 10,
        seed: int = 0,
        scaler=None,
        backend: str = "auto",
        block_transport: str = "auto",
        sync=None,
    ):
        self._setup(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})

    @property
    def subnets(self) -> int:
        return self.cfg.subnets

    @property
    def subnet(self) -> int:
        """This rank's subnetwork."""
        return self.sync.subnet

    @property
    def active_blocks(self) -> list[int]:
        """Indices into `blocks` of the blocks this rank trains now."""
        return [i for i, s in enumerate(self.switches) if s.active]


class LocalSGD(_Rounds):
    """Local SGD under the same contract: every rank trains the whole model, and the last step of
    each round averages the weights (and the optimizer state) over every rank."""

    who = "hist.LocalSGD"
    kind = "local-sgd"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        local_iters: int = 50,
        *,
        optimizer_state: str = "average",
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        shared_precision: str = "fp32",
        shared_topk: float = 0.0,
        round_schedule: str = "constant",
        qsr_alpha: float = 0.1,
        post_local_steps: int | None = None,
        scaler=None,
        backend: str = "auto",
        sync=None,
    ):
        self._setup(
            model,
            None,
            optimizer,
            local_iters=local_iters,
            subnets=0,
            aggregate="copy",
            optimizer_state=optimizer_state,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            min_depth=0,
            shared_precision=shared_precision,
            shared_topk=shared_topk,
            block_precision="fp32",
            balance="none",
            round_schedule=round_schedule,
            qsr_alpha=qsr_alpha,
            post_local_steps=post_local_steps,
            warmup_local_sgd_rounds=0,
            test_scale="auto",
            overlap=True,
            plan_check_every=10,
            seed=0,
            scaler=scaler,
            backend=backend,
            block_transport="auto",
            sync=sync,
        )


class Training(_Rounds):
    """hist-train's session: any of hist's methods by name (`cfg.method`: ist, local-sgd, dp) on
    hist's own ResNet, the options read from the run's `Config`, and three things a loop that
    owns its schedule supplies: every round's first step fixed ahead (`round_starts`, so qsr reads
    the rate each step will have), the decision at a round's last step before anything is
    aggregated (`on_round_end`, returning a `RoundEndChoice`), and the clock that times the
    gradient and round synchronisations as sync. Each round begins when the loop calls
    `begin_round()`."""

    who = "hist-train"
    defers = True

    def __init__(self, model, optimizer, cfg, sync, *, round_starts, on_round_end, clock, scaler=None,
                 warm_rounds: int = 0):  # fmt: skip
        self.kind = cfg.method
        modules = model.partitioned_blocks()
        names = {id(m): n for n, m in model.named_modules()}
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        self._build(model, modules, names, trained, optimizer, cfg, sync, scaler, warm_rounds,
                    round_starts=list(round_starts), on_round_end=on_round_end, clock=clock)  # fmt: skip
        self._pending = True

    def _sync_buffers(self, plan) -> None:
        """Nothing: hist-train never reads BatchNorm's running statistics (training normalises by
        batch; each evaluation recomputes them for the full model, or normalises by batch)."""
