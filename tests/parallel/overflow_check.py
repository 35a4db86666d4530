"""Run under mpirun: an fp16 step whose gradients overflow on one rank only, before averaging.

Argument: METHOD, "ist" (4 ranks, 2 subnetworks of 2 ranks) or "dp" (2 ranks). Rank 1 makes one
of its own gradients infinite, as an fp16 overflow in its backward pass would, before the
gradients are averaged; no rank tells another about it. Checks that every rank that averages
gradients with rank 1 skips the step and halves its loss scale (the inf survives the average,
so each scaler sees it), that they still hold identical weights, and (ist) that the other
subnetwork, which averages nothing with rank 1, steps and keeps its scale. Prints OK on success.
"""

import sys

import numpy as np
import torch

from hist.comm import Synchroniser
from hist.config import Config
from hist.engine.precision import Precision
from hist.methods import IST, DataParallel
from hist.models import build_model

method_name = sys.argv[1]
torch.set_num_threads(1)
subnets = 2 if method_name == "ist" else 1
sync = Synchroniser(subnets)
cfg = Config(arch="preact_resnet34", width=0.0625, local_iters=1, seed=3, lr=0.05, precision="fp16")
torch.manual_seed(cfg.seed)
model = build_model(cfg.arch, 10, cfg.width)
sync.broadcast_model(model)
opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
method = (IST if method_name == "ist" else DataParallel)(model, sync, cfg, opt)
precision = Precision("fp16", torch.device("cpu"))


def flat():
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


method.begin_round(0)
before = flat()
gen = torch.Generator().manual_seed(sync.rank)
x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
model.zero_grad(set_to_none=True)
with precision.autocast():
    loss = torch.nn.functional.cross_entropy(model(x), y)
precision.backward(loss)
if sync.rank == 1:  # an overflow in this rank's backward pass: the other ranks' gradients are finite
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
method.after_backward()
scale = precision.scaler.get_scale()
precision.step(method.optimizer, method.step)

with_rank1 = sync.rank < 2  # ist: subnetwork 0 is ranks 0 and 1; dp: both ranks
after = flat()
stepped = not np.array_equal(before, after)
assert stepped != with_rank1, (sync.rank, stepped)
assert (precision.scaler.get_scale() < scale) == with_rank1, (sync.rank, precision.scaler.get_scale())
assert precision.skipped == int(with_rank1)
peers = sync.world.allgather(after)
group = [0, 1] if with_rank1 else [2, 3]
assert all(np.array_equal(peers[group[0]], peers[r]) for r in group), "ranks of one subnetwork parted"
print(f"OK rank {sync.rank}")
