"""Which parameters IST partitions, and what a subnetwork costs.

The rule itself (`layer3[1:]`) is `PreActResNet.partitioned_blocks`; everything here derives
from it, so the partition is defined once.
"""

from __future__ import annotations

import torch

from .resnet import PreActResNet, build_model


def partitioned_block_count(arch: str) -> int:
    """How many blocks IST splits in `arch` (22 in ResNet-101), without building real weights."""
    with torch.device("meta"):
        return len(build_model(arch, 10, 1 / 64).partitioned_blocks())


def shared_and_partitioned(model: PreActResNet):
    """(shared parameter list, per-block parameter lists) in a fixed order, identical on every rank."""
    block_params = [list(b.parameters()) for b in model.partitioned_blocks()]
    in_blocks = {id(p) for ps in block_params for p in ps}
    shared = [p for p in model.parameters() if id(p) not in in_blocks]
    return shared, block_params


def conv_flops(model: PreActResNet, active) -> float:
    """Forward multiply-adds of the convolutions and classifier with the given partitioned blocks on."""
    flops, hw = 0.0, 32 * 32
    chosen = set(active)
    parts = model.partitioned_blocks()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            flops += m.in_features * m.out_features
    flops += model.conv1.in_channels * model.conv1.out_channels * 9 * hw
    for stage, scale in ((model.layer1, 1), (model.layer2, 4), (model.layer3, 16), (model.layer4, 64)):
        for block in stage:
            if block in parts and parts.index(block) not in chosen:
                continue
            out_hw = hw / scale
            for conv in (block.conv1, block.conv2, block.shortcut):
                if conv is not None:
                    k = conv.kernel_size[0] * conv.kernel_size[1]
                    flops += conv.in_channels * conv.out_channels * k * out_hw
    return flops
