"""A small pre-norm vision transformer on CIFAR-10, trained with IST over its blocks in an
ordinary PyTorch loop: the model, the data and the loop are this file's; hist adds two lines.

    python examples/vit_cifar.py --data-dir DIR                          # one process
    horovodrun -np 2 python examples/vit_cifar.py --data-dir DIR        # IST at 2 processes (Horovod + MPI)
    torchrun --nproc-per-node 2 examples/vit_cifar.py --data-dir DIR    # IST at 2 processes (torch.distributed)
    ... --method local-sgd                                               # local SGD under the same contract

DIR holds cifar-10-batches-py/ (the official "python version"). A pre-norm block computes
x + attention(norm(x)), then + mlp(norm(.)): as a whole x + f(x), so IST can partition the
blocks, as LayerDrop and stochastic depth drop them. Tiny for tests:
--train-images 256 --test-images 128 --epochs 1 --dim 32 --depth 4 --heads 2 --batch-size 32.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hist

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ------------------------------------------------------------ the model
class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then + mlp(LN(.))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim=96, depth=6, heads=3, mlp_ratio=2.0, patch=4, classes=10, image=32):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


# ------------------------------------------------------------ the data
def load_cifar(root: Path, train: bool, limit: int = 0):
    """(images uint8 N x 3 x 32 x 32, labels int64) from the official python pickles."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    for name in names:
        with open(root / "cifar-10-batches-py" / name, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d["labels"], dtype=np.int64))
    x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    return (x[:limit], y[:limit]) if limit else (x, y)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random 32x32 crop of each image padded by 4 with zeros, and a horizontal flip of half."""
    n = len(x)
    padded = F.pad(x, (4, 4, 4, 4)).permute(0, 2, 3, 1)  # N x 40 x 40 x 3
    dy, dx = torch.randint(0, 9, (n, 1), generator=g), torch.randint(0, 9, (n, 1), generator=g)
    rows, cols = dy + torch.arange(32), dx + torch.arange(32)
    out = padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def batches(x, y, batch, rank, size, epoch, seed, split):
    """This rank's batches of one epoch: its shard of one permutation (shard), or the whole set
    in an order of its own (full: every worker passes the whole training set)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch * 10 + (rank if split == "full" else 0))
    order = torch.randperm(len(x), generator=g)
    if split == "shard":
        order = order[rank::size]
    for i in range(0, len(order) - batch + 1, batch):
        idx = order[i : i + batch]
        yield normalise(augment(x[idx], g)), y[idx]


@torch.no_grad()
def evaluate(model, x, y, batch=500):
    model.eval()
    hits = 0
    for i in range(0, len(x), batch):
        hits += (model(normalise(x[i : i + batch])).argmax(1) == y[i : i + batch]).sum().item()
    return 100.0 * hits / len(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--method", choices=("ist", "local-sgd"), default="ist")
    p.add_argument("--data-split", choices=("full", "shard"), default="full")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--local-iters", type=int, default=50)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument(
        "--shared-ends",
        type=int,
        default=0,
        help="ist: the first and the last N blocks stay shared, IST partitions those between (0: all)",
    )
    p.add_argument("--train-images", type=int, default=0, help="first N training images (0: all)")
    p.add_argument("--test-images", type=int, default=0, help="first N test images (0: all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, help="rank 0 appends one JSON line per epoch here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = ViT(args.dim, args.depth, args.heads, args.mlp_ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # hist: the one line that makes this loop IST (or local SGD); the launcher says how many ranks.
    if args.method == "ist":
        partitioned = list(model.blocks)[args.shared_ends : len(model.blocks) - args.shared_ends]
        run = hist.IST(model, partitioned, optimizer, local_iters=args.local_iters)
    else:
        run = hist.LocalSGD(model, optimizer, local_iters=args.local_iters)
    rank, size = run.rank, run.size

    train_x, train_y = load_cifar(args.data_dir, True, args.train_images)
    test_x, test_y = load_cifar(args.data_dir, False, args.test_images)
    per_rank = len(train_x) if args.data_split == "full" else len(train_x) // size
    steps_per_epoch = per_rank // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)

    def lr_factor(step):  # linear warm-up, then a cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    if rank == 0:
        print(
            f"vit_cifar: {args.method} at {size} process(es), engine {run.engine}, {len(train_x)} training images "
            f"({args.data_split}: {steps_per_epoch} steps an epoch a process), depth {args.depth} dim {args.dim}",
            flush=True,
        )
    wall = 0.0
    for epoch in range(args.epochs):
        model.train()
        start, cpu, losses = time.perf_counter(), time.process_time(), []
        for x, y in batches(train_x, train_y, args.batch_size, rank, size, epoch, args.seed, args.data_split):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            losses.append(loss.item())
        train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        wall += train_s
        with run.full_model():  # every rank: the aggregated model, blocks scaled by 1/S
            accuracy = evaluate(model, test_x, test_y)
        line = {
            "epoch": epoch + 1,
            "method": args.method if size > 1 else "single",
            "processes": size,
            "train_loss": sum(losses) / max(1, len(losses)),
            "test_accuracy": accuracy,
            "train_seconds": train_s,
            "train_seconds_total": wall,
            "train_cpu_seconds": train_cpu_s,  # this process's (rank 0's) CPU time: robust to a busy machine
        }
        if rank == 0:
            print(json.dumps(line), flush=True)
            if args.results:
                with open(args.results, "a") as f:
                    f.write(json.dumps({**line, "args": {k: str(v) for k, v in vars(args).items()}}) + "\n")
    return line


if __name__ == "__main__":
    main()
