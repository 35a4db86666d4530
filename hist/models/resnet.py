"""Pre-activation ResNets for 32x32 images whose residual blocks can be switched off.

IST trains shallow subnetworks of one deep network: a block outside the current
subnetwork is skipped entirely (identity, no compute), and at test time the residual
branch of a partitioned block is scaled by the fraction of subnetworks that trained it.
The model knows nothing of ranks or plans; the training loop sets `active` and `scale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Blocks per stage (basic blocks, two 3x3 convolutions each).
BLOCK_COUNTS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
ARCHS = tuple(f"preact_resnet{d}" for d in BLOCK_COUNTS)


class PreActBlock(nn.Module):
    """BN-ReLU-conv, BN-ReLU-conv, plus a shortcut (1x1 conv where the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        # Switched off: forward returns its input untouched (only valid without a shortcut conv).
        self.active = True
        # Multiplies the residual branch; 1 in training, the keep-fraction at test time.
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        if self.scale != 1.0:
            out = out * self.scale
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for CIFAR-sized inputs; `width` multiplies the 64/128/256/512 channels."""

    def __init__(self, depth: int = 101, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if depth not in BLOCK_COUNTS:
            raise ValueError(f"depth {depth} not in {sorted(BLOCK_COUNTS)}")
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        in_planes = widths[0]
        stages = []
        for i, (count, planes) in enumerate(zip(BLOCK_COUNTS[depth], widths)):
            blocks = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def partitioned_blocks(self) -> list[PreActBlock]:
        """The blocks IST splits between subnetworks: layer3[1:] (the strided layer3[0] is shared)."""
        return list(self.layer3)[1:]

    def set_subnetwork(self, active_blocks) -> None:
        """Switch on exactly the partitioned blocks whose indices are in `active_blocks`."""
        chosen = set(active_blocks)
        for i, block in enumerate(self.partitioned_blocks()):
            block.active = i in chosen
            block.scale = 1.0

    def set_full(self, scale: float = 1.0) -> None:
        """All blocks on; partitioned residual branches scaled by `scale` (test-time IST model)."""
        for block in self.partitioned_blocks():
            block.active = True
            block.scale = scale


def build_model(arch: str, num_classes: int, width: float = 1.0) -> PreActResNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return PreActResNet(int(arch.removeprefix("preact_resnet")), num_classes, width)
