"""BatchNorm statistics for the full model, recomputed: what subnetworks gathered describes
shallower networks."""

from __future__ import annotations

import torch


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches) -> None:
    """Recompute BatchNorm statistics for the full model: running statistics gathered by
    subnetworks describe shallower networks, so they are not kept or communicated at all."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for x, _ in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
