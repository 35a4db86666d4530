"""Pre-activation ResNets whose residual blocks can be switched off, in two families.

IST trains shallow subnetworks of one deep network: a block outside the current
subnetwork is skipped entirely (identity, no compute), and at test time the residual
branch of a partitioned block is scaled by the fraction of subnetworks that trained it.
The model knows nothing of ranks or plans; the training loop sets `active` and `scale`.

The CIFAR family (`preact_resnet*`, the IST paper's models) has a 3x3 stride-1 stem and
basic blocks at every depth, so its "101" is 33 basic blocks; its parameters and state_dict
keys are what the published counts and existing checkpoints refer to. The ImageNet family
(`imagenet_preact_resnet*`, He et al. 2016 "Identity mappings") has a 7x7 stride-2 stem with
3x3 stride-2 max-pooling, basic blocks for 18/34 and bottlenecks for 50/101/152.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Blocks per stage (He et al. 2016); both families use these counts for a given depth.
BLOCK_COUNTS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# The one table of architectures: style -> (name prefix, depths offered).
FAMILIES = {
    "cifar": ("preact_resnet", (18, 34, 101, 152)),
    "imagenet": ("imagenet_preact_resnet", (18, 34, 50, 101, 152)),
}
# Architecture name -> (style, depth); ARCHS keeps the names in table order.
ARCH_SPECS = {f"{prefix}{depth}": (style, depth) for style, (prefix, depths) in FAMILIES.items() for depth in depths}
ARCHS = tuple(ARCH_SPECS)


def uses_bottlenecks(style: str, depth: int) -> bool:
    """He et al. switch to bottlenecks from 50 layers on; the CIFAR family never does (as published)."""
    return style == "imagenet" and depth >= 50


class SwitchableBlock(nn.Module):
    """A pre-activation residual block that IST can switch off or scale.

    Subclasses define `bn1` (the pre-activation), `shortcut` (None or a conv applied to the
    pre-activated input) and `residual_branch`; forward is shared so both block types treat
    `active` and `scale` identically.
    """

    expansion = 1

    def __init__(self):
        super().__init__()
        # Switched off: forward returns its input untouched (only valid without a shortcut conv).
        self.active = True
        # Multiplies the residual branch; 1 in training, the keep-fraction at test time.
        self.scale = 1.0

    def residual_branch(self, preactivated: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.residual_branch(out)
        if self.scale != 1.0:
            out = out * self.scale
        return out + shortcut


class PreActBlock(SwitchableBlock):
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

    def residual_branch(self, preactivated: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(preactivated))))


class PreActBottleneck(SwitchableBlock):
    """BN-ReLU-1x1, BN-ReLU-3x3 (strided, as in ResNet v1.5), BN-ReLU-1x1 to 4x planes, plus a shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def residual_branch(self, preactivated: torch.Tensor) -> torch.Tensor:
        out = self.conv1(preactivated)
        out = self.conv2(F.relu(self.bn2(out)))
        return self.conv3(F.relu(self.bn3(out)))


class PreActResNet(nn.Module):
    """Pre-activation ResNet; `width` multiplies the 64/128/256/512 channels.

    `style="cifar"` (default) is the 32x32 model with a 3x3 stem and basic blocks;
    `style="imagenet"` has the 7x7 stride-2 stem, 3x3 stride-2 max-pooling and, from depth 50,
    bottleneck blocks. The stem conv is not followed by BN-ReLU: every block pre-activates its input.
    """

    def __init__(self, depth: int = 101, num_classes: int = 10, width: float = 1.0, style: str = "cifar"):
        super().__init__()
        if style not in FAMILIES:
            raise ValueError(f"style {style!r} not in {sorted(FAMILIES)}")
        depths = FAMILIES[style][1]
        if depth not in depths:
            raise ValueError(f"depth {depth} not in {sorted(depths)} for style {style!r}")
        self.style = style
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        if style == "imagenet":
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.stem_pool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.stem_pool = None
        block_type = PreActBottleneck if uses_bottlenecks(style, depth) else PreActBlock
        in_planes = widths[0]
        stages = []
        for i, (count, planes) in enumerate(zip(BLOCK_COUNTS[depth], widths)):
            blocks = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_type(in_planes, planes, stride))
                in_planes = planes * block_type.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.stem_pool is not None:
            out = self.stem_pool(out)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def partitioned_blocks(self) -> list[SwitchableBlock]:
        """The blocks IST splits between subnetworks: layer3[1:] (the strided layer3[0] is shared)."""
        return list(self.layer3)[1:]

    def set_subnetwork(self, active_blocks) -> None:
        """Switch on exactly the partitioned blocks whose indices are in `active_blocks`."""
        chosen = set(active_blocks)
        for i, block in enumerate(self.partitioned_blocks()):
            block.active = i in chosen
            block.scale = 1.0

    def inactive_params(self) -> list[torch.Tensor]:
        """The parameters of the partitioned blocks switched off (they get no gradient)."""
        return [p for b in self.partitioned_blocks() if not b.active for p in b.parameters()]

    def set_full(self, scale: float = 1.0) -> None:
        """All blocks on; partitioned residual branches scaled by `scale` (test-time IST model)."""
        for block in self.partitioned_blocks():
            block.active = True
            block.scale = scale


def build_model(arch: str, num_classes: int, width: float = 1.0) -> PreActResNet:
    """The model named `arch` (one of ARCHS), either family."""
    if arch not in ARCH_SPECS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    style, depth = ARCH_SPECS[arch]
    return PreActResNet(depth, num_classes, width, style)
