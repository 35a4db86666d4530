"""Which ranks exchange which blocks: the pure part of synchronisation (no MPI needed)."""

from hist.comm import Traffic, round_bytes, schedule_blocks
from hist.models.plan import make_plan


def test_copy_sends_each_block_from_its_owner_only_to_next_trainers():
    plan, nxt = make_plan(0, 0, 22, 4), make_plan(0, 1, 22, 4)
    ops = schedule_blocks(plan, nxt, 1, "copy")
    assert all(op.kind == "bcast" for op in ops)
    seen = {}
    for op in ops:
        for b in op.blocks:
            assert op.root == plan.owner[b]
            receivers = set(op.ranks) - {op.root}
            assert receivers == set(nxt.holders(b)) - {plan.owner[b]}
            seen[b] = op
    # a block that its owner trains again next round goes nowhere
    for b in range(22):
        if nxt.holders(b) == (plan.owner[b],):
            assert b not in seen


def test_full_sync_reaches_every_rank_and_uses_columns_of_process_sets():
    plan = make_plan(0, 0, 22, 2)
    ops = schedule_blocks(plan, None, 2, "copy")  # 4 ranks: subnet 0 = {0,1}, subnet 1 = {2,3}
    for op in ops:
        assert len(op.ranks) == 2 and op.ranks[1] - op.ranks[0] == 2  # rank j talks to rank j of the other set
    covered = {(r, b) for op in ops for r in op.ranks for b in op.blocks}
    assert all((r, b) in covered or r // 2 == plan.owner[b] for r in range(4) for b in range(22))


def test_average_reduces_over_all_holders_first():
    plan, nxt = make_plan(0, 0, 22, 4, min_depth=8), make_plan(0, 1, 22, 4, min_depth=8)
    ops = schedule_blocks(plan, nxt, 1, "average")
    reduce_ops = [op for op in ops if op.kind == "allreduce"]
    assert reduce_ops and ops[: len(reduce_ops)] == reduce_ops
    for op in reduce_ops:
        for b in op.blocks:
            assert op.ranks == plan.holders(b)


def test_byte_accounting_of_collectives():
    t = Traffic()
    t.allreduce(1000, 4)
    t.broadcast(100, 3, is_root=True)
    assert t.take() == (1500 + 200, 1500)
    # sizes in fp32 bytes (whole float32 values, as round_bytes counts them)
    sent, received = round_bytes(make_plan(0, 0, 22, 2), None, 1, "copy", [40] * 22, 1000)
    # shared: 2 ranks x 1000 (ring 2(k-1)/k); blocks: each owner sends its 11 blocks once
    assert sent == 2 * 1000 + 22 * 40 and received == sent
