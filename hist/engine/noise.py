"""The gradient noise scale, measured in the run (McCandlish et al. 2018, Appendix A).

A probe takes one unaugmented training batch per rank (different on every rank), splits it in two
halves, and takes the gradient of each half on the full global model without a step. The squared
norm of a half's gradient (batch b = B/2, averaged over the 2N halves) and that of their average
over all ranks (batch 2N b) are the two norms the estimator needs (`analysis.noise`). The probe
leaves the model, its BatchNorm buffers, the optimizer and the data order as they were, so a run
with probes trains exactly like one without.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm import Synchroniser


@dataclass
class NoiseProbe:
    """One probe's raw figures, the same on every rank."""

    small_batch: int  # images behind one small gradient (half a rank's batch)
    big_batch: int  # images behind the averaged gradient (all ranks' halves)
    small_sq: float  # |G_small|^2, the mean over the 2N half-batch gradients
    big_sq: float  # |G_big|^2 of their average


def probe_noise(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float, sync: Synchroniser
) -> NoiseProbe:
    """Gradients of two halves of (x, y) on the full model scaled as for evaluation; the model is
    left untouched (no .grad written: `autograd.grad`, so no data-parallel hook fires either)."""
    half = len(y) // 2
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # BatchNorm's running statistics
    model.set_full(scale)
    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    flats, small_sq = [], 0.0
    for part in (slice(0, half), slice(half, 2 * half)):
        grads = torch.autograd.grad(loss_fn(model(x[part]), y[part]), params)
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        small_sq += float(flat.double().square().sum())
        flats.append(flat)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    mean = (flats[0] + flats[1]) / 2
    # Horovod: one allreduce of a full gradient, averaged over all ranks (the cost of one dp step).
    sync.average_over_world([mean])
    total = sync.sum_over_world([small_sq / 2])[0]
    return NoiseProbe(half, 2 * half * sync.size, total / sync.size, float(mean.double().square().sum()))
