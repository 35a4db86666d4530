"""Which parameters IST partitions, and what a subnetwork costs.

The rule itself (`layer3[1:]`) is `PreActResNet.partitioned_blocks`; everything here derives
from it, so the partition is defined once.
"""

from __future__ import annotations

import itertools

import torch
from torch.func import functional_call

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


def conv_flops(model: PreActResNet, active, image_size: int | tuple[int, int] = 32) -> float:
    """Forward multiply-adds per image of the convolutions and classifier with the given partitioned blocks on.

    Measured rather than derived from the layout, so it holds for either stem, either block type and any
    input size: one forward of a (1, 3, H, W) input runs on the meta device (no arithmetic, no real
    weights touched, BN statistics untouched) while hooks count each Conv2d and Linear. The model's
    block states and train/eval modes are restored afterwards. Pooling and elementwise work is ignored.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    flops = 0.0

    def count(module: torch.nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal flops
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            flops += output.numel() * (module.in_channels // module.groups) * kernel
        else:
            flops += output.numel() * module.in_features

    blocks = model.partitioned_blocks()
    saved_blocks = [(b.active, b.scale) for b in blocks]
    saved_modes = [(m, m.training) for m in model.modules()]
    hooks = [
        m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    on_meta = {
        name: torch.empty_like(t, device="meta")
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    try:
        model.set_subnetwork(active)
        model.eval()  # Batch statistics of a 1-image batch can be undefined (1x1 maps); eval never needs them.
        with torch.no_grad():
            functional_call(model, on_meta, (torch.empty(1, 3, height, width, device="meta"),))
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in saved_modes:
            m.training = training
        for b, (was_active, scale) in zip(blocks, saved_blocks):
            b.active, b.scale = was_active, scale
    return flops
