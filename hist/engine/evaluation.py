"""Evaluation of the global model: BatchNorm recalibrated for the full network, then the whole
test split, shared among the ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..comm import Synchroniser
from ..data import DeviceLoader
from ..models import recalibrate_batchnorm


@torch.no_grad()
def evaluate(
    model, test: DeviceLoader, calibration, sync: Synchroniser, scale: float, batch_size: int, bn: str = "recalibrate"
) -> tuple[float, float, float]:
    """(mean loss, top-1 %, top-5 %) of the full model on the whole test split, shared among ranks.

    `bn` "batch" normalises each test batch by its own statistics (training mode, as the ResIST
    release evaluates); the running statistics it leaves are never used, since each evaluation
    recalibrates or ignores them and training normalises by batch."""
    model.set_full(scale)
    if bn == "batch":
        model.train()
    else:
        recalibrate_batchnorm(model, calibration)
        model.eval()
    # Sums stay on the model's device (no host read per batch; a CPU tensor stacked with CUDA
    # scalars would fail) and come to the host once, for the allreduce.
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for x, y in test.eval_batches(batch_size, sync.rank, sync.size):
        out = model(x).float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        hits = top == y[:, None]
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(1).sum()
        sums[3] += len(y)
    total = sync.sum_over_world(sums.tolist())
    model.train()
    return total[0] / total[3], 100.0 * total[1] / total[3], 100.0 * total[2] / total[3]
