"""Projected speedup past the machines we have: measured step time, modelled communication.

Time per epoch of N GPUs = steps x step time + rounds x synchronisation, where
- steps = images per GPU / batch, where a GPU passes images / N per epoch under `--data-split
  shard` and all images under `full` (so there time per epoch does not divide by N);
  rounds = steps / local_iters;
- a step of the full model takes the measured one-process step time t; an IST step with S
  subnetworks takes t x (shared FLOP share + partitioned FLOP share x blocks per subnetwork /
  all partitioned blocks) (measured step ratios follow the FLOP ratios within a few percent);
- communication follows a latency-bandwidth model: a ring allreduce of M bytes over k ranks
  costs 2(k-1) x latency + 2(k-1)/k x M / bandwidth; a point-to-point send of M bytes costs
  latency + M / bandwidth.
IST uses S = min(N, largest power of two <= partitioned blocks) subnetworks; with more GPUs
than that, each subnetwork spans N/S GPUs that allreduce its gradients every step. dp
allreduces the whole model every step, local SGD every round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..choices import METHODS, SINGLE
from ..comm import ring_allreduce_bytes
from ..data.order import ranks_sharing_an_epoch
from ..models import build_model, conv_flops, make_plan, shared_and_partitioned

# The largest global batch at which the published accuracy holds: ResIST reports up to 8
# machines with 128 images each (Dun et al., 2022).
PUBLISHED_GLOBAL_BATCH = 8 * 128


@dataclass(frozen=True)
class Network:
    latency_s: float = 5e-6  # per message (about InfiniBand / NVLink class)
    bandwidth_Bps: float = 12.5e9  # bytes per second per link (100 Gb/s)

    def allreduce(self, nbytes: float, k: int) -> float:
        return 0.0 if k <= 1 else 2 * (k - 1) * self.latency_s + ring_allreduce_bytes(nbytes, k) / self.bandwidth_Bps

    def send(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Workload:
    step_s: float  # measured full-model step time, one process
    images: int  # training images per epoch
    batch: int  # per GPU
    local_iters: int
    shared_bytes: float
    block_bytes: tuple[float, ...]
    shared_flop_share: float  # FLOPs outside the partitioned blocks / all FLOPs
    data_split: str = "shard"  # shard | full: what one GPU passes per epoch (hist-train --data-split)

    def steps_per_gpu(self, n_gpus: int) -> float:
        return self.images / ranks_sharing_an_epoch(n_gpus, self.data_split) / self.batch

    @property
    def full_bytes(self) -> float:
        return self.shared_bytes + sum(self.block_bytes)

    def ist_step_fraction(self, subnets: int) -> float:
        n = len(self.block_bytes)
        depth = make_plan(0, 0, n, subnets).depth()
        return self.shared_flop_share + (1 - self.shared_flop_share) * depth / n


def workload_for(
    arch: str,
    num_classes: int,
    width: float,
    step_s: float,
    images: int,
    batch: int,
    local_iters: int,
    image_size: int = 32,
    data_split: str = "shard",
) -> Workload:
    model = build_model(arch, num_classes, width)
    shared, blocks = shared_and_partitioned(model)
    n = len(blocks)
    share = conv_flops(model, [], image_size) / conv_flops(model, range(n), image_size)
    size = lambda ps: float(sum(p.numel() * 4 for p in ps))
    return Workload(step_s, images, batch, local_iters, size(shared), tuple(size(b) for b in blocks), share, data_split)


def ist_subnets(n_gpus: int, n_blocks: int) -> int:
    s = 1
    while s * 2 <= min(n_gpus, n_blocks):
        s *= 2
    return s


def epoch_seconds(method: str, n_gpus: int, w: Workload, net: Network) -> float:
    steps = w.steps_per_gpu(n_gpus)
    rounds = steps / w.local_iters
    if n_gpus == 1:
        return steps * w.step_s
    if method == "dp":
        return steps * (w.step_s + net.allreduce(w.full_bytes, n_gpus))
    if method == "local-sgd":
        return steps * w.step_s + rounds * net.allreduce(w.full_bytes, n_gpus)
    s = ist_subnets(n_gpus, len(w.block_bytes))
    group = n_gpus // s
    frac = w.ist_step_fraction(s)
    active_bytes = w.shared_bytes + frac * sum(w.block_bytes)
    step = w.step_s * frac + net.allreduce(active_bytes, group)
    # each subnetwork's blocks go to one other subnetwork on average: per rank ~1/S of the blocks
    blocks = net.send(sum(w.block_bytes) * (s - 1) / s / s)
    return steps * step + rounds * (net.allreduce(w.shared_bytes, n_gpus) + blocks)


def caveats(n_gpus: int, w: Workload) -> list[str]:
    """Why the projection at `n_gpus` is not a claim about accuracy: an epoch too short for one
    round per GPU, or a global batch beyond the published ones."""
    out = []
    steps = w.steps_per_gpu(n_gpus)
    if steps < w.local_iters:
        out.append(f"{steps:.1f} steps per GPU per epoch, fewer than one round of {w.local_iters}")
    if n_gpus * w.batch > PUBLISHED_GLOBAL_BATCH:
        out.append(f"global batch {n_gpus * w.batch} beyond the published {PUBLISHED_GLOBAL_BATCH}")
    return out


def project(w: Workload, net: Network, gpus=tuple(2**i for i in range(11))) -> dict:
    """{method: {N: speedup over one GPU}} for N in `gpus`."""
    base = epoch_seconds(SINGLE, 1, w, net)
    return {m: {n: base / epoch_seconds(m, n, w, net) for n in gpus} for m in METHODS}


def workload_from_run(run, data_split: str = "shard") -> Workload | None:
    """The workload of a one-process run's timing file (its measured step time), for N GPUs
    under `data_split`."""
    from ..choices import FOLDER_DATASETS
    from ..data import NUM_CLASSES

    r, a = run.rounds, run.attrs
    if int(a["world_size"]) != 1 or not len(r["steps"]):
        return None
    step_s = float((r["compute_s"][:, 0] + r["data_s"][:, 0]).sum() / r["steps"].sum())
    cfg = run.config
    if int(a.get("train_images", 0)) <= 0 or step_s <= 0:
        return None  # a file without the run's size (written by other tools or tests)
    with torch.device("meta"):
        return workload_for(
            a["arch"],
            NUM_CLASSES.get(a["dataset"], 10),
            float(a.get("width", 1.0)),
            step_s,
            int(a["train_images"]),
            int(cfg.get("batch_size", 128)),
            int(cfg.get("local_iters", 50)),
            int(cfg.get("crop", 224)) if a["dataset"] in FOLDER_DATASETS else 32,  # the training crop
            data_split,
        )
