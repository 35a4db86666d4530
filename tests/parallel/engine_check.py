"""Run under horovodrun or mpirun: one real IST round through hist's own classes, checked.

Arguments: SUBNETS AGGREGATE MIN_DEPTH [SHARED_PRECISION]. Each rank trains on its own random data, then:
- exactly the blocks the plan gave its subnetwork (and all shared parameters) changed;
- ranks of one subnetwork hold identical parameters (gradients averaged on the process set);
- after a round synchronised towards the next plan, every rank that trains a block next
  holds exactly the expected aggregate (copy: the owner's values; average: the holders' mean);
- after a full synchronisation every rank holds the identical global model.
Prints OK on success.
"""
import sys

import numpy as np
import torch

from hist.config import Config
from hist.models import build_model
from hist.sync import Synchroniser
from hist.train import IST

subnets, aggregate, min_depth = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
precision = sys.argv[4] if len(sys.argv) > 4 else "fp32"
torch.set_num_threads(1)
sync = Synchroniser(subnets)
cfg = Config(arch="preact_resnet34", width=0.0625, aggregate=aggregate, min_depth=min_depth,
             local_iters=2, seed=11, lr=0.05, shared_precision=precision)
torch.manual_seed(cfg.seed)
model = build_model(cfg.arch, 10, cfg.width)
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
        torch.nn.functional.cross_entropy(model(x), y).backward()
        ist.after_backward()
        opt.step()


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
    np.testing.assert_allclose(flat(ist.shared), np.mean(shared_all, axis=0), rtol=0,
                               atol=1e-6 if precision == "fp32" else 1e-3)
    for b in range(len(after)):
        holders = plan.holders(b)
        needs = True if full else sync.subnet in next_plan.holders(b)
        if not needs:
            continue
        if aggregate == "copy" or len(holders) == 1:
            expected = everyone[plan.owner[b] * g][b]
            assert np.array_equal(flat(ist.blocks[b]), expected), (sync.rank, r, b)
        else:
            expected = np.mean([everyone[s * g][b] for s in holders], axis=0)
            np.testing.assert_allclose(flat(ist.blocks[b]), expected, rtol=0, atol=1e-6)

state = flat(list(model.parameters()))
assert all(np.array_equal(state, other) for other in world.allgather(state)), "models differ after full sync"
print(f"OK rank {sync.rank} subnet {sync.subnet}")
