"""--balance speed: block counts from measured speeds (pure functions), and the test-time scale of uneven plans."""

import numpy as np
import pytest

from hist.methods.balance import SpeedBalancer
from hist.models import build_model, even_counts, make_plan, next_counts, target_counts


def step_time(k, v, d, shared, block):
    return d + (shared + k * block) / v


def test_target_counts_equalise_the_step_time_and_sum_to_the_blocks():
    shared, block, v, d = 10.8, 1.0, np.array([2.0, 1.0, 1.5]), np.array([0.5, 0.0, 1.0])
    k = target_counts(22, shared, block, v, d)
    assert k.sum() == pytest.approx(22)
    times = step_time(k, v, d, shared, block)
    assert times == pytest.approx(np.full(3, times[0]))
    # a subnetwork too slow for even one block is held at one, the others share the rest
    k = target_counts(22, 30.0, 1.0, [50.0, 1.0], [0.0, 0.0])
    assert k[1] == 1 and k.sum() == pytest.approx(22)


def test_next_counts_move_one_block_per_subnetwork_and_round():
    target = target_counts(22, 10.8, 1.0, [2.0, 1.0], [0.0, 0.0])  # about 18.3 and 3.7
    counts, seen = even_counts(22, 2), []
    for _ in range(12):
        new = next_counts(counts, target)
        assert sum(new) == 22 and max(abs(a - b) for a, b in zip(new, counts)) <= 1
        counts = new
        seen.append(counts)
    assert counts == (18, 4)
    assert seen[0] == (12, 10)


def test_equal_speeds_with_noisy_timings_keep_the_even_counts():
    """Even workers whose measured step times scatter by 5% a round: the moving average and the
    hysteresis keep every count within one block of the others."""
    model = build_model("preact_resnet101", 10, 1 / 16)
    balancer = SpeedBalancer(model, 22, 4, 1)
    rng = np.random.default_rng(0)
    for _ in range(300):
        blocks = list(balancer.counts)
        work = balancer.shared_cost + balancer.block_cost * np.asarray(blocks, dtype=float)
        compute = work * 1e-9 * 50 * (1 + 0.05 * rng.standard_normal(4))
        balancer.observe(blocks, 50, np.full(4, 0.01), compute)
        assert max(balancer.counts) - min(balancer.counts) <= 1


def test_balance_speed_with_a_method_that_has_no_blocks_is_one_clear_line():
    from hist.config import Config
    from hist.errors import HistError

    with pytest.raises(HistError, match="--balance speed moves IST's blocks; --method dp"):
        Config(method="dp", balance="speed").validate()
    Config(method="ist", balance="speed").validate()


def test_plans_follow_the_counts_and_every_block_is_held():
    plan = make_plan(3, 7, 22, 3, counts=(12, 6, 4))
    assert [len(b) for b in plan.blocks] == [12, 6, 4]
    assert sorted(b for bs in plan.blocks for b in bs) == list(range(22))
    assert make_plan(3, 7, 22, 3) == make_plan(3, 7, 22, 3, counts=even_counts(22, 3))  # even: the plans of before
    for bad in ((12, 6, 3), (22, 0, 0), (11, 11)):
        with pytest.raises(ValueError, match="block counts"):
            make_plan(3, 7, 22, 3, counts=bad)


@pytest.mark.parametrize("counts,min_depth", [((4, 1), 0), ((4, 1), 3), ((7, 2, 1), 2)])
def test_test_time_scale_of_an_uneven_plan_is_each_blocks_training_probability(counts, min_depth):
    """The scale is the probability that a block is in the network a training image passes through
    (every subnetwork trains as many images): counted over many rounds of the fixed uneven counts."""
    n, subnets = sum(counts), len(counts)
    rounds = 4000
    present = np.zeros(n)
    for r in range(rounds):
        plan = make_plan(0, r, n, subnets, min_depth, counts)
        for bs in plan.blocks:
            present[list(bs)] += 1 / subnets
    measured = present / rounds
    scale = make_plan(0, 0, n, subnets, min_depth, counts).keep_fraction()
    assert measured == pytest.approx(np.full(n, scale), abs=0.03)
    if min_depth == 0:
        assert scale == pytest.approx(1 / subnets)


def test_balancer_gives_a_slower_subnetwork_fewer_blocks_and_resumes_exactly():
    model = build_model("preact_resnet101", 10, 1 / 16)
    a = SpeedBalancer(model, 22, 2, 1)
    b = None
    for r in range(30):
        blocks = list(a.counts)
        work = a.shared_cost + a.block_cost * np.asarray(blocks, dtype=float)
        compute = work / np.array([2.0, 1.0]) * 1e-9 * 50  # rank 1 computes at half the speed of rank 0
        a.observe(blocks, 50, [0.01, 0.01], compute)
        if r == 9:
            b = SpeedBalancer(model, 22, 2, 1)
            b.load_state_dict(a.state_dict())
        elif b is not None:
            b.observe(blocks, 50, [0.01, 0.01], compute)
            assert b.counts == a.counts
    assert a.counts[0] > a.counts[1] + 8
    shared, block = a.shared_cost, a.block_cost
    times = [(shared + k * block) / v for k, v in zip(a.counts, (2.0, 1.0))]
    even = (shared + 11 * block) / 1.0
    assert max(times) < even / 1.3


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_ranks_agree_on_balanced_plans_record_the_counts_and_resume(tmp_path):
    """A real 2-rank run with --balance speed: the plan digest is checked every 10 rounds (the counts
    are computed on each rank, never sent), the timing file has each subnetwork's blocks per
    round (drawn by hist-report), and a SIGKILLed run resumes from its checkpoint's balancer state to
    the end (the counts follow measured times, so the resumed rounds need not match the reference's)."""
    from test_rounds import TINY
    from test_train import cut_and_resume, rounds

    args = ["synthetic", "--epochs", "6", *TINY, "--checkpoint-every", "3", "--balance", "speed"]
    ref, out, a, b = cut_and_resume(tmp_path, *args)
    for path, ckpt in ((ref, a), (out, b)):
        r, _, attrs = rounds(path)
        blocks = r["blocks"]
        assert blocks.shape == (len(r["round"]), 2) and (blocks.sum(axis=1) == 5).all()
        assert (blocks >= 1).all()  # (evenness under noise: test_equal_speeds_with_noisy_timings...)
        state = ckpt["hist"]["method"]["balance"]
        assert sum(state["counts"]) == 5 and len(state["rate"]) == 2 and all(v > 0 for v in state["rate"])
        assert attrs["status"] == "completed"
    from test_report import hist_report  # in this process: the command's own code, no process start

    assert hist_report(ref, "-o", tmp_path / "report").returncode == 0  # the counts drawn against the round time
    assert (tmp_path / "report" / "blocks_per_round.png").stat().st_size > 0
