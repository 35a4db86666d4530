"""Run under horovodrun or mpirun: real IST rounds through hist's own classes, checked.

Arguments: SUBNETS SPEC [SPEC ...], each SPEC one configuration checked in turn on the same
ranks (one launch for several: a launch costs more than a check), written
AGGREGATE,MIN_DEPTH,SHARED_PRECISION,OPTIMIZER_STATE,OUTER,STEP,OVERLAP: OUTER "plain" or
"nesterov" (outer lr 0.7, momentum 0.9), STEP "fp32" or "bf16-cl" (bf16 autocast with a
channels_last model and batches), OVERLAP "overlap" (block transfers while the shared allreduce
is in flight, the default) or "sequential". Each rank trains on its own random data, then:
- exactly the blocks the plan gave its subnetwork (and all shared parameters) changed;
- ranks of one subnetwork hold identical parameters (gradients averaged on the process set);
- after a round synchronised towards the next plan, every rank that trains a block next
  holds exactly the expected aggregate (copy: the owner's values; average: the holders' mean);
  (with the outer step in round 0: start - 0.7 * 1.9 * (start - aggregate), the outer momentum
  starting at zero);
- after a full synchronisation every rank holds the identical global model, and with
  `average` the identical momentum buffers.
Prints one OK line per rank and SPEC; a failed check names its SPEC.
"""

import sys

import numpy as np
import torch

from hist.comm import Synchroniser
from hist.config import Config
from hist.methods import IST
from hist.models import build_model

OUTER_FACTOR = 0.7 * 1.9  # first round: Nesterov with a zero buffer steps lr * (1 + momentum) * change
torch.set_num_threads(1)


def check(sync, spec: str) -> None:
    """One configuration: two rounds (the second ending in a full synchronisation), checked."""
    aggregate, min_depth, precision, opt_state, outer, step, overlap = spec.split(",")
    min_depth, outer = int(min_depth), outer == "nesterov"
    bf16_channels_last, overlap = step == "bf16-cl", overlap == "overlap"
    cfg = Config(
        arch="preact_resnet34",
        width=0.0625,
        aggregate=aggregate,
        min_depth=min_depth,
        local_iters=2,
        seed=11,
        lr=0.05,
        shared_precision=precision,
        optimizer_state=opt_state,
        outer_lr=0.7 if outer else 1.0,
        outer_momentum=0.9 if outer else 0.0,
        overlap=overlap,
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, 10, cfg.width)
    layout = torch.channels_last if bf16_channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_channels_last)
    sync.broadcast_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    ist = IST(model, sync, cfg, opt)
    world = sync.world

    def flat(tensors):
        return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy().copy()

    def local_round(r):
        ist.begin_round(r)
        gen = torch.Generator().manual_seed(1000 * r + sync.rank)
        for _ in range(cfg.local_iters):
            x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
            model.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=layout)), y)
            loss.backward()
            ist.after_backward()
            ist.step()

    for r, full in ((0, False), (1, True)):
        before = [flat(ps) for ps in ist.blocks]
        shared_before = flat(ist.shared)
        local_round(r)
        plan = ist.plan
        mine = set(plan.blocks[sync.subnet])
        after = [flat(ps) for ps in ist.blocks]
        changed = {b for b in range(len(before)) if not np.array_equal(before[b], after[b])}
        assert changed == mine, (sync.rank, r, changed, mine)
        assert not np.array_equal(shared_before, flat(ist.shared))
        everyone = world.allgather(after)  # [rank][block] -> values before aggregation
        g = sync.ranks_per_subnet
        for b in range(len(after)):  # ranks of one subnetwork trained identically
            base = sync.subnet * g
            assert all(np.array_equal(everyone[base + j][b], everyone[base][b]) for j in range(g))
        shared_all = world.allgather(flat(ist.shared))
        ist.end_round(r, full=full)
        next_plan = None if full else ist.plan_for(r + 1)
        # fp16 rounds only the round's change (|change| < 1 here): error below 2^-11 of it
        atol = 1e-6 if precision == "fp32" else 1e-3

        def stepped(start, aggregate):
            return start - OUTER_FACTOR * (start - aggregate) if outer else aggregate

        if r == 0 or not outer:
            np.testing.assert_allclose(
                flat(ist.shared),
                stepped(shared_before, np.mean(shared_all, axis=0)),
                rtol=0,
                atol=atol * (OUTER_FACTOR if outer else 1),
            )
        # where each block started the round: its owner's values (every rank calls every bcast)
        starts = [
            world.bcast(before[b] if sync.rank == plan.owner[b] * g else None, root=plan.owner[b] * g)
            for b in range(len(after))
        ]
        for b in range(len(after)):
            holders = plan.holders(b)
            needs = True if full else sync.subnet in next_plan.holders(b)
            if not needs:
                continue
            start = starts[b]
            if outer and r > 0:
                continue  # the outer momentum is no longer zero; the full sync below still checks agreement
            if aggregate == "copy" or len(holders) == 1:
                expected = stepped(start, everyone[plan.owner[b] * g][b])
                if outer:
                    np.testing.assert_allclose(flat(ist.blocks[b]), expected, rtol=0, atol=1e-5)
                else:
                    assert np.array_equal(flat(ist.blocks[b]), expected), (sync.rank, r, b)
            else:
                expected = stepped(start, np.mean([everyone[s * g][b] for s in holders], axis=0))
                np.testing.assert_allclose(flat(ist.blocks[b]), expected, rtol=0, atol=1e-5)

    if bf16_channels_last:  # the layout survived the round: every aggregate was copied back in place
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    state = flat(list(model.parameters()))
    assert all(np.array_equal(state, other) for other in world.allgather(state)), "models differ after full sync"
    if opt_state == "average":
        momentum = flat([opt.state[p]["momentum_buffer"] for p in model.parameters()])
        assert np.abs(momentum).sum() > 0
        assert all(np.array_equal(momentum, o) for o in world.allgather(momentum)), "momentum differs after full sync"
    print(f"OK rank {sync.rank} subnet {sync.subnet} {spec}", flush=True)


sync = Synchroniser(int(sys.argv[1]))
for spec in sys.argv[2:]:
    try:
        check(sync, spec)
    except Exception:
        print(f"FAILED rank {sync.rank}: {spec}", flush=True)
        raise
