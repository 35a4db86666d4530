import pytest

from hist.models.plan import make_plan, validate


@pytest.mark.parametrize("subnets", [1, 2, 3, 4, 8, 22])
def test_plan_splits_every_block_once_in_equal_groups(subnets):
    plan = make_plan(seed=1, round_index=5, n_blocks=22, subnets=subnets)
    sizes = [len(b) for b in plan.blocks]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(b for bs in plan.blocks for b in bs) == list(range(22))
    assert all(plan.blocks[plan.owner[b]].count(b) == 1 for b in range(22))
    assert plan.keep_fraction() == pytest.approx(1 / subnets)


def test_plan_is_a_pure_function_and_changes_between_rounds():
    a = make_plan(3, 7, 22, 4, 0)
    assert a == make_plan(3, 7, 22, 4, 0)
    assert a.digest == make_plan(3, 7, 22, 4, 0).digest
    assert a.blocks != make_plan(3, 8, 22, 4, 0).blocks
    assert a.blocks != make_plan(4, 7, 22, 4, 0).blocks
    assert a.digest != make_plan(3, 8, 22, 4, 0).digest


def test_min_depth_adds_shared_blocks():
    plan = make_plan(0, 0, 22, 8, min_depth=5)
    assert all(len(b) >= 5 for b in plan.blocks)
    assert set(range(22)) <= {b for bs in plan.blocks for b in bs}
    assert any(len(plan.holders(b)) > 1 for b in range(22))
    # each owner still holds its own block
    assert all(plan.owner[b] in plan.holders(b) for b in range(22))
    assert plan.keep_fraction() == pytest.approx(sum(len(b) for b in plan.blocks) / (8 * 22))


@pytest.mark.parametrize("subnets,min_depth", [(23, 0), (0, 0), (2, 23), (2, -1)])
def test_impossible_plans_are_refused(subnets, min_depth):
    with pytest.raises(ValueError):
        validate(22, subnets, min_depth)
