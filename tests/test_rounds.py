"""Round lengths over a run (--round-schedule): constant, post-local SGD and the quadratic
synchronisation rule, as pure functions, and a killed run with each resumed exactly."""

import numpy as np
import pytest

from hist.config import Config
from hist.engine.rounds import round_starts, rounds_before
from hist.errors import HistError

from helpers import TINY_RUN


def lengths(starts):
    return np.diff(starts).tolist()


def test_constant_rounds_cut_the_run_into_local_iters():
    starts = round_starts(Config(epochs=2, local_iters=4), steps_per_epoch=10, peak=0.1)
    assert starts == [0, 4, 8, 12, 16, 20] and rounds_before(starts, 5) == 2


def test_post_local_averages_every_step_until_the_first_drop():
    cfg = Config(epochs=4, local_iters=5, round_schedule="post-local", warmup_epochs=0)
    starts = round_starts(cfg, steps_per_epoch=10, peak=0.1)
    assert lengths(starts) == [1] * 20 + [5] * 4  # 40 steps: every step until step 20 (lr / 10), then 5


def test_qsr_rounds_lengthen_as_the_learning_rate_falls():
    cfg = Config(epochs=100, local_iters=4, round_schedule="qsr", qsr_alpha=0.2, warmup_epochs=0)
    starts = round_starts(cfg, steps_per_epoch=10, peak=0.1)  # 1000 steps; lr 0.1, 0.01 at 500, 0.001 at 750
    first_after = lambda step: next(b - a for a, b in zip(starts, starts[1:]) if a >= step)
    assert first_after(0) == 4  # (0.2 / 0.1)^2 = 4
    assert first_after(500) == 400  # (0.2 / 0.01)^2
    assert starts[-1] == 1000 and max(lengths(starts)) <= 400
    with pytest.raises(HistError, match="--qsr-alpha"):
        Config(round_schedule="qsr", qsr_alpha=0).validate()


TINY = TINY_RUN


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_rounds_and_model(tmp_path):
    """A resumed run finds its place in rounds of changing length. Every schedule reaches the loop
    as one list of round starts (round_starts, tested above for each); qsr's rounds change
    length after the first checkpoint, so a qsr run is the one cut here (post-local had a cut
    run of its own too, through the same path)."""
    from test_train import cut_and_resume, rounds, same_model

    args = ["synthetic", "--epochs", "6", *TINY, "--checkpoint-every", "3", "--round-schedule", "qsr"]
    args += ["--qsr-alpha", "0.1", "--warmup-epochs", "0"]
    ref, out, a, b = cut_and_resume(tmp_path, *args)
    assert same_model(a["model"], b["model"])
    r_ref, r_out = rounds(ref)[0], rounds(out)[0]
    assert r_ref["steps"].tolist() == r_out["steps"].tolist() and np.array_equal(r_ref["loss"], r_out["loss"])
    steps = r_ref["steps"].tolist()  # 48 steps a rank: the schedule's own lengths
    # peak 0.2 (2 ranks, linear): 4-step rounds, then (0.1 / 0.02)^2 = 25 after the drop
    assert steps[:6] == [4] * 6 and max(steps) > 4 and sum(steps) == 48
