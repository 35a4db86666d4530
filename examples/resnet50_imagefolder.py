"""A torchvision-style ResNet-50 trained on an image folder with IST, in an ordinary PyTorch loop:
the model, the data and the loop are this file's; hist adds two lines.

    python examples/resnet50_imagefolder.py --data-dir DIR                          # one process
    horovodrun -np 2 python examples/resnet50_imagefolder.py --data-dir DIR        # IST at 2 processes (Horovod + MPI)
    torchrun --nproc-per-node 2 examples/resnet50_imagefolder.py --data-dir DIR    # IST at 2 processes (torch.distributed)

DIR holds train/<class>/*.JPEG and val/<class>/*.JPEG (ImageNet, Imagenette, Imagewoof...). The
network is torchvision's ResNet-50 (v1.5: post-activation bottlenecks, the stride on the 3x3),
written out here because torchvision's wheels need not import beside torch. Its IST blocks are
the 12 bottlenecks that keep their input's shape (all but the first of each stage): each returns
relu(x + f(x)), which on its non-negative input is x + g(x), a residual block. Tiny for tests:
--width 0.0625 --crop 64 --resize 72 --train-images 64 --epochs 1 --batch-size 8.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import hist

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXTENSIONS = (".jpeg", ".jpg", ".png")


# ------------------------------------------------------------ the model (torchvision's layout)
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), classes=1000, width=1.0, zero_init_residual=False):
        super().__init__()
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * Bottleneck.expansion, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(**kwargs) -> ResNet:
    return ResNet((3, 4, 6, 3), **kwargs)


# ------------------------------------------------------------ the data (PIL, no torchvision)
def index_folder(root: Path):
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    items = [
        (path, label)
        for label, c in enumerate(classes)
        for path in sorted((root / c).iterdir())
        if path.suffix.lower() in EXTENSIONS
    ]
    return items, classes


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    width, height = img.size
    for _ in range(10):
        area = width * height * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def center_crop(img: Image.Image, size: int, resize: int) -> Image.Image:
    width, height = img.size
    scale = resize / min(width, height)
    img = img.resize((max(resize, round(width * scale)), max(resize, round(height * scale))), Image.BILINEAR)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


class Folder(torch.utils.data.Dataset):
    def __init__(self, items, crop: int, resize: int, train: bool, seed: int):
        self.items, self.crop, self.resize, self.train, self.seed = items, crop, resize, train, seed
        self.epoch = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with Image.open(path) as f:
            img = f.convert("RGB")
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            img = random_resized_crop(img, self.crop, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = center_crop(img, self.crop, self.resize)
        return to_tensor(img), label


class RankSampler(torch.utils.data.Sampler):
    """This rank's indices of an epoch: its shard of one permutation, or (full) the whole set in
    an order of its own."""

    def __init__(self, n, rank, size, seed, split):
        self.n, self.rank, self.size, self.seed, self.split = n, rank, size, seed, split
        self.epoch = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(
            self.seed * 1000 + self.epoch * 10 + (self.rank if self.split == "full" else 0)
        )
        order = torch.randperm(self.n, generator=g).tolist()
        return iter(order[self.rank :: self.size] if self.split == "shard" else order)

    def __len__(self):
        return self.n // self.size if self.split == "shard" else self.n


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * hits / max(1, total)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--method", choices=("ist", "local-sgd"), default="ist")
    p.add_argument("--data-split", choices=("shard", "full"), default="shard")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--local-iters", type=int, default=50)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1: ResNet-50 as published)")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--train-images", type=int, default=0, help="N training images spread over the classes (0: all)")
    p.add_argument("--bn-batches", type=int, default=4, help="training batches that recalibrate BatchNorm")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (spawned)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    train_items, classes = index_folder(args.data_dir / "train")
    val_items, _ = index_folder(args.data_dir / "val")
    if args.train_images:
        train_items = train_items[:: max(1, len(train_items) // args.train_images)][: args.train_images]
        val_items = val_items[:: max(1, len(val_items) // args.train_images)][: args.train_images]
    torch.manual_seed(args.seed)
    model = resnet50(classes=len(classes), width=args.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage[1:]]
    # hist: the one line that makes this loop IST (or local SGD); the launcher says how many ranks.
    if args.method == "ist":
        run = hist.IST(model, blocks, optimizer, local_iters=args.local_iters)
    else:
        run = hist.LocalSGD(model, optimizer, local_iters=args.local_iters)
    rank, size = run.rank, run.size

    workers = {"num_workers": args.workers, "multiprocessing_context": "spawn"} if args.workers else {}
    train_set = Folder(train_items, args.crop, args.resize, True, args.seed)
    sampler = RankSampler(len(train_set), rank, size, args.seed, args.data_split)
    train_loader = torch.utils.data.DataLoader(
        train_set, args.batch_size, sampler=sampler, drop_last=True, persistent_workers=bool(args.workers), **workers
    )
    val_loader = torch.utils.data.DataLoader(Folder(val_items, args.crop, args.resize, False, 0), 2 * args.batch_size)
    steps_per_epoch = len(sampler) // args.batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, args.epochs * steps_per_epoch))
    if rank == 0:
        print(
            f"resnet50_imagefolder: {args.method} at {size} process(es), engine {run.engine}, {len(blocks)} blocks, "
            f"{len(train_items)} training images in {len(classes)} classes, {steps_per_epoch} steps an epoch a process",
            flush=True,
        )
    line = {}
    for epoch in range(args.epochs):
        sampler.epoch = train_set.epoch = epoch
        model.train()
        start, losses = time.perf_counter(), []
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            losses.append(loss.item())
        train_s = time.perf_counter() - start
        # BatchNorm statistics gathered by subnetworks describe shallower networks: recomputed
        # for the full model on a few training batches, then every rank evaluates it.
        calibration = [x for x, _ in zip((x for x, _ in train_loader), range(args.bn_batches))]
        with run.full_model(calibration=calibration):
            accuracy = evaluate(model, val_loader)
        line = {
            "epoch": epoch + 1,
            "method": args.method if size > 1 else "single",
            "processes": size,
            "train_loss": sum(losses) / max(1, len(losses)),
            "val_accuracy": accuracy,
            "train_seconds": train_s,
        }
        if rank == 0:
            print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
