"""Accuracy of a finished run's full model on the exact and the JPEG-recovered CIFAR-10 test images
(../shared/data/cifar10/test_exact_mask.npy), under both --eval-bn choices, one process.

    python tools/eval_exact_subset.py RUN.ckpt.pt DATA_DIR [--scale 0.125] [--bn-batches 8]

Why: `--eval-bn batch` normalises each test batch by its own statistics, which also adapts the
model to a shifted test distribution (here 90% of the test images are JPEG copies); splitting the
accuracy by the exact images tells adaptation from a better model."""

import argparse
from pathlib import Path

import numpy as np
import torch

from hist.data.loader import DeviceLoader
from hist.data.sources import read_cifar10
from hist.models import build_model, recalibrate_batchnorm


@torch.no_grad()
def hits(model, loader, order, batch_size, train_mode):
    model.train(train_mode)
    out = torch.zeros(len(loader), dtype=torch.bool)
    for s in range(0, len(order), batch_size):
        idx = torch.as_tensor(order[s : s + batch_size])
        x, y = loader.normalise(loader.images[idx]), loader.labels[idx]
        out[idx] = model(x).argmax(1) == y
    return out.numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--scale", type=float, default=0.125, help="the run's test-time scale (1/S)")
    ap.add_argument("--bn-batches", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    model = build_model(cfg["arch"], 10, cfg["width"])
    model.load_state_dict(ckpt["model"])
    model.set_full(a.scale)
    train = DeviceLoader(
        read_cifar10(a.data_dir / "cifar-10-batches-py", True),
        "cifar10",
        cfg["batch_size"],
        torch.device("cpu"),
        cfg["seed"],
    )
    test = DeviceLoader(
        read_cifar10(a.data_dir / "cifar-10-batches-py", False), "cifar10", 256, torch.device("cpu"), 0, augment=False
    )
    exact = np.load(a.data_dir / "test_exact_mask.npy")
    everything = np.arange(len(test))
    recalibrate_batchnorm(model, train.calibration_batches(a.bn_batches))
    rows = {"recalibrate": hits(model, test, everything, 256, False)}
    rows["batch (mixed batches, as hist-train)"] = hits(model, test, everything, 256, True)
    only = np.zeros(len(test), dtype=bool)
    for part in (np.flatnonzero(exact), np.flatnonzero(~exact)):  # batches of one kind of image only
        only[part] = hits(model, test, part, 256, True)[part]
    rows["batch (exact and JPEG images in separate batches)"] = only
    print(f"| --eval-bn | all {len(test)} | exact ({exact.sum()}) | JPEG-recovered ({(~exact).sum()}) |")
    print("| --- | --- | --- | --- |")
    for name, h in rows.items():
        print(f"| {name} | {100 * h.mean():.2f}% | {100 * h[exact].mean():.2f}% | {100 * h[~exact].mean():.2f}% |")


if __name__ == "__main__":
    main()
