"""The network: pre-activation ResNets (CIFAR and ImageNet style) with switchable blocks, the partition,
the plan of a round."""

from .balance import next_counts, target_counts
from .calibration import recalibrate_batchnorm
from .partition import conv_flops, partitioned_block_count, shared_and_partitioned
from .plan import Plan, even_counts, make_plan
from .resnet import ARCHS, BLOCK_COUNTS, PreActBlock, PreActBottleneck, PreActResNet, SwitchableBlock, build_model

__all__ = [
    "ARCHS",
    "BLOCK_COUNTS",
    "Plan",
    "PreActBlock",
    "PreActBottleneck",
    "PreActResNet",
    "SwitchableBlock",
    "build_model",
    "conv_flops",
    "even_counts",
    "make_plan",
    "next_counts",
    "partitioned_block_count",
    "recalibrate_batchnorm",
    "shared_and_partitioned",
    "target_counts",
]
