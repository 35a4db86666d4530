"""hist's training step against a bare PyTorch step of the same subnetwork.

The bare step is what a user would write for the subnetwork a rank trains this round: an
`nn.Sequential` of the very modules that are active (the same weights), cross-entropy,
backward and `torch.optim.SGD.step`, with nothing else: no clock, no precision switch, no
method hooks. hist's step is `engine.step.TrainStep`, the one the round loop runs, with its
clock, precision switch and method. The two alternate on the same batches in one process, so
a neighbour's load falls on both alike; the figure is the median of the per-pair ratios.

Run as a module under a launcher (`python -m hist.analysis.steps`) it measures that rank's
step inside a real IST job: rank 0 prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from .. import data as datasets
from ..comm import connect
from ..config import Config
from ..engine.clock import PhaseClock
from ..engine.precision import Precision, prefers_channels_last
from ..engine.step import TrainStep, one_round_step
from ..models import PreActResNet, build_model
from ..world import world_info_from_env


def bare_network(model: PreActResNet) -> nn.Sequential:
    """The subnetwork the model runs now (its active blocks), as a plain Sequential of its modules."""
    head = [model.conv1] + ([model.stem_pool] if model.stem_pool is not None else [])
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer if b.active]
    tail = [model.bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.linear]
    return nn.Sequential(*head, *blocks, *tail)


def compare(train_step: TrainStep, model: PreActResNet, batches, pairs: int, warmup: int = 2) -> dict:
    """Alternate hist's step and the bare step on the same batches; seconds and their ratio."""
    bare = bare_network(model)
    opt = torch.optim.SGD(
        bare.parameters(),
        lr=train_step.optimizer.param_groups[0]["lr"],
        momentum=train_step.optimizer.param_groups[0]["momentum"],
        weight_decay=train_step.optimizer.param_groups[0]["weight_decay"],
    )
    cuda = next(model.parameters()).device.type == "cuda"

    def bare_step(x, y):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(bare(x), y).backward()
        opt.step()

    def timed(fn, x, y) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(x, y)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    hist_s, bare_s = [], []
    train_step.clock.start()
    for i in range(warmup + pairs):
        x, y = batches(i)
        # which runs first alternates, so neither always meets a warm cache
        first, second = (train_step, bare_step) if i % 2 == 0 else (bare_step, train_step)
        a, b = timed(first, x, y), timed(second, x, y)
        if i >= warmup:
            hist_s.append(a if first is train_step else b)
            bare_s.append(b if first is train_step else a)
    return {
        "hist_step_s": statistics.median(hist_s),
        "bare_step_s": statistics.median(bare_s),
        "bare_step_ratio": statistics.median(h / b for h, b in zip(hist_s, bare_s)),
        "pairs": pairs,
    }


def measure(sync, width: float, batch: int, pairs: int, device: torch.device, method: str = "ist") -> dict:
    """Build a run as hist-train does (model, method, precision, loader) and compare its step
    with the bare one over the first round's subnetwork."""
    cfg = Config(dataset="synthetic", width=width, batch_size=batch, method=method, data_split="full")
    torch.manual_seed(cfg.seed)
    split, _ = datasets.load("synthetic", seed=cfg.seed, synthetic_size=batch * 4)
    loader = datasets.DeviceLoader(split, "synthetic", batch, device, cfg.seed, sync.rank, sync.size, data_split="full")
    layout = torch.channels_last if prefers_channels_last(device) else torch.contiguous_format  # hist-train's default
    model = build_model(cfg.arch, 10, width).to(device, memory_format=layout)
    loader.memory_format = layout
    train_step = one_round_step(cfg, model, sync, cfg.lr, Precision(cfg.precision, device), PhaseClock(device))
    train_step.set_lr(cfg.lr)
    out = compare(train_step, model, lambda i: loader.batch(i % loader.steps_per_epoch), pairs)
    out.update(width=width, batch=batch, processes=sync.size, channels_last=layout == torch.channels_last)
    return out


def main(argv=None) -> None:
    """One rank of a launched job: measure, and rank 0 prints the figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.0625)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    world = world_info_from_env()
    device = torch.device(args.device)
    sync = connect(world.size, world.size, device=device)  # IST with one rank a subnetwork
    out = measure(sync, args.width, args.batch, args.pairs, device)
    ratios = sync.allgather(out["bare_step_ratio"])
    if sync.rank == 0:
        out["bare_step_ratio_per_rank"] = ratios
        out["bare_step_ratio"] = max(ratios)
        sys.stdout.write(json.dumps(out) + "\n")  # one write: mpirun tags a lone newline as a line of its own
        sys.stdout.flush()


if __name__ == "__main__":
    main()
