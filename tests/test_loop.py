"""The round loop in this process (one rank, no launcher): its rounds, its round-end decisions,
a stop, a diverged loss and an exact resume, driven through hist.IST's session (`api.Training`)."""

import math

import pytest
import torch

from hist import data as datasets
from hist.comm import connect
from hist.config import Config
from hist.engine import StopFlag
from hist.engine.loop import Run
from hist.errors import CollectiveError
from hist.methods import build_optimizer
from hist.models import build_model

# 128 synthetic images in batches of 16: 8 steps an epoch, rounds of 2 steps.
CFG = Config(arch="preact_resnet18", width=0.0625, synthetic_size=128, synthetic_test_size=64, batch_size=16,
             local_iters=2, epochs=2, bn_batches=1, eval_every=3, checkpoint_every=2)  # fmt: skip


class Recorder:
    """What the loop hands rank 0's recorder (the timing file's calls), kept in lists."""

    def __init__(self):
        self.rounds, self.evals, self.ended = [], [], None

    def add_round(self, r, steps, epoch, wall_s, per_rank, lr=None, blocks=None):
        self.rounds.append((r, steps, per_rank["loss"][0]))

    def add_eval(self, r, epoch, wall_s, loss, acc, top5):
        self.evals.append((r, acc))

    def finish(self, status, wall_s):
        self.ended = status


def parts(cfg):
    torch.manual_seed(cfg.seed)
    train_split, test_split = datasets.load(
        "synthetic", None, cfg.seed, synthetic_size=cfg.synthetic_size, synthetic_test_size=cfg.synthetic_test_size
    )
    cpu = torch.device("cpu")
    model = build_model(cfg.arch, 10, cfg.width)
    loaders = (
        datasets.DeviceLoader(train_split, "synthetic", cfg.batch_size, cpu, cfg.seed, 0, 1, augment=False),
        datasets.DeviceLoader(test_split, "synthetic", cfg.eval_batch_size, cpu, cfg.seed, augment=False),
    )
    return model, build_optimizer(cfg, model, cfg.lr), *loaders


def run(cfg, stop=None, resume_state=None, watch=None):
    """`hist-train` in this process; returns (result, recorder, saved checkpoints, model)."""
    model, optimizer, train_data, test_data = parts(cfg)
    recorder, saved = Recorder(), []
    sync = connect(1, 1)
    r = Run(cfg, model, optimizer, sync, train_data, test_data, cfg.lr, recorder, saved.append, lambda *a: None,
            stop, {}, None)  # fmt: skip
    if watch is not None:
        watch(r)
    try:
        result = r.run(r.begin(resume_state))
    finally:
        r.session.close()
    return result, recorder, saved, model


def test_every_round_ends_with_the_decision_its_options_ask_for():
    decided = []

    def watch(r):
        inner = r.round_end

        def round_end(i):
            choice = inner(i)
            decided.append((i, choice.full, choice.stop_only))
            return choice

        r.session.on_round_end = round_end

    result, rec, saved, _ = run(CFG, watch=watch)
    # 16 steps in 8 rounds; evaluations every 3 rounds and at the end, checkpoints every 2
    assert [r for r, *_ in rec.rounds] == list(range(8)) and all(steps == 2 for _, steps, _ in rec.rounds)
    assert [r for r, _ in rec.evals] == [2, 5, 7]
    assert [s["round"] for s in saved] == [2, 4, 6, 8]
    full = {i for i, f, _ in decided if f}
    assert [i for i, *_ in decided] == list(range(8)) and full == {1, 2, 3, 5, 7}
    assert not any(stop_only for *_, stop_only in decided)
    assert result.final_accuracy == rec.evals[-1][1] and not result.stopped_early
    assert all(math.isfinite(loss) for *_, loss in rec.rounds)


def test_a_stop_checkpoints_at_the_round_end_and_the_resumed_run_ends_with_the_same_weights():
    straight = run(CFG)
    stopped = run(CFG, stop=StopFlag(after_rounds=3))
    result, rec, saved, _ = stopped
    assert result.stopped_early and [r for r, *_ in rec.rounds] == [0, 1, 2]
    last = saved[-1]
    assert last["round"] == 3 and last["hist"]["step"] == 6  # stopped at its third round's end
    resumed = run(CFG, resume_state=last)
    assert [r for r, *_ in resumed[1].rounds] == list(range(3, 8))
    assert [loss for *_, loss in straight[1].rounds] == [loss for *_, loss in rec.rounds + resumed[1].rounds]
    a, b = straight[3].state_dict(), resumed[3].state_dict()
    assert all(
        torch.equal(a[k], b[k]) for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )


def test_a_diverged_loss_ends_the_run_before_its_round_is_aggregated():
    cfg = Config(**{**CFG.as_dict(), "lr": 1e12, "checkpoint_every": 1})
    with pytest.raises(CollectiveError, match=r"training diverged in round \d+ .*try a lower --lr"):
        run(cfg)
