import pytest
import torch
from torch import nn

from hist.models import (
    ARCHS,
    PreActBlock,
    PreActBottleneck,
    PreActResNet,
    build_model,
    conv_flops,
    partitioned_block_count,
    shared_and_partitioned,
)

torch.set_num_threads(1)


def test_switched_off_block_is_identity_and_skips_compute():
    model = PreActResNet(18, 10, width=0.25)
    block = model.layer3[1]
    block.active = False
    x = torch.randn(2, block.bn1.num_features, 8, 8)
    calls = []
    block.conv1.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(block(x), x)
    assert calls == []


def test_scale_multiplies_the_residual_branch_only():
    model = PreActResNet(18, 10, width=0.25).eval()
    block = model.layer3[1]
    x = torch.randn(2, block.bn1.num_features, 8, 8)
    full = block(x)
    block.scale = 0.25
    scaled = block(x)
    torch.testing.assert_close(scaled - x, 0.25 * (full - x))


def test_resnet101_parameter_counts_match_the_published_figures():
    model = build_model("preact_resnet101", 100)
    total = sum(p.numel() for p in model.parameters())
    shared, blocks = shared_and_partitioned(model)
    n_shared = sum(p.numel() for p in shared)
    per_block = [sum(p.numel() for p in ps) for ps in blocks]
    assert len(blocks) == 22
    assert abs(total - 41.4e6) / 41.4e6 < 0.01
    assert abs(n_shared - 15.4e6) / 15.4e6 < 0.01
    assert all(abs(n - 1.18e6) / 1.18e6 < 0.01 for n in per_block)
    assert n_shared + sum(per_block) == total


def test_block_counts_of_the_family():
    for depth, blocks in ((18, 2), (34, 6), (101, 23), (152, 36)):
        model = build_model(f"preact_resnet{depth}", 10, width=0.0625)
        assert len(model.layer3) == blocks
        assert len(model.partitioned_blocks()) == blocks - 1


def test_subnetwork_forward_uses_only_its_blocks():
    model = PreActResNet(34, 10, width=0.125)
    model.set_subnetwork([0, 3])
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    for i, block in enumerate(model.partitioned_blocks()):
        has_grad = block.conv1.weight.grad is not None
        assert has_grad == (i in (0, 3))
    model.set_full(0.5)
    assert all(b.active and b.scale == 0.5 for b in model.partitioned_blocks())


# ImageNet-style family, conv_flops and the architecture registry.


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bn_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())


def _torchvision_bn_params(stage_blocks) -> int:
    """BN weights and biases of torchvision's post-activation bottleneck ResNet: a stem BN, a BN after
    each of a block's three convs (planes, planes, 4*planes) and one per stage's projection shortcut."""
    channels = 64 + sum(n * 6 * planes + 4 * planes for n, planes in zip(stage_blocks, (64, 128, 256, 512)))
    return 2 * channels


def _on_meta(arch: str, num_classes: int, width: float = 1.0):
    with torch.device("meta"):
        return build_model(arch, num_classes, width)


# Convolutions and classifier are exactly torchvision's ResNet-50/101 (v1.5: stride on the 3x3), so
# only the batch norms differ. torchvision normalises each conv's output (planes, planes, 4*planes),
# each projection shortcut and the stem; a pre-activation network normalises each block's input
# (its in_planes, planes, planes), has no BN on the stem or the shortcuts, and one BN(2048) before
# the pooling. Per stage that is 2*(16*planes - 2*in_planes) fewer (896+1536+3072+6144), 2*64 fewer
# for the stem, 2*2048 more at the end: 7,680 parameters fewer, at depth 50 and 101 alike.
@pytest.mark.parametrize(
    ("arch", "stage_blocks", "torchvision_count", "ours"),
    [
        ("imagenet_preact_resnet50", (3, 4, 6, 3), 25_557_032, 25_549_352),
        ("imagenet_preact_resnet101", (3, 4, 23, 3), 44_549_160, 44_541_480),
    ],
)
def test_imagenet_parameter_counts_match_torchvision_up_to_bn_placement(arch, stage_blocks, torchvision_count, ours):
    model = _on_meta(arch, 1000)
    total = _params(model)
    assert total == ours == torchvision_count - 7_680
    assert total - _bn_params(model) + _torchvision_bn_params(stage_blocks) == torchvision_count
    assert abs(total - torchvision_count) / torchvision_count < 0.005


def test_imagenet_family_blocks_and_partition():
    expected = {18: (PreActBlock, 1), 34: (PreActBlock, 5), 50: (PreActBottleneck, 5)}
    expected.update({101: (PreActBottleneck, 22), 152: (PreActBottleneck, 35)})
    for depth, (block_type, partitioned) in expected.items():
        arch = f"imagenet_preact_resnet{depth}"
        model = _on_meta(arch, 10, 1 / 32)
        assert all(type(b) is block_type for stage in (model.layer1, model.layer4) for b in stage)
        assert isinstance(model.stem_pool, nn.MaxPool2d) and model.conv1.kernel_size == (7, 7)
        assert partitioned_block_count(arch) == len(model.partitioned_blocks()) == partitioned
    assert partitioned_block_count("preact_resnet101") == 22 and partitioned_block_count("preact_resnet152") == 35


def test_registry_holds_both_families_once():
    assert len(set(ARCHS)) == len(ARCHS) == 9
    assert {a for a in ARCHS if not a.startswith("imagenet_")} == {f"preact_resnet{d}" for d in (18, 34, 101, 152)}
    for arch in ARCHS:
        assert _on_meta(arch, 10, 1 / 32).style == ("imagenet" if arch.startswith("imagenet_") else "cifar")


def test_build_model_rejects_unknown_names_listing_the_choices():
    with pytest.raises(ValueError, match="imagenet_preact_resnet50") as info:
        build_model("resnet50", 10)
    assert all(arch in str(info.value) for arch in ARCHS)
    with pytest.raises(ValueError):
        PreActResNet(50, 10)  # the CIFAR family has no ResNet-50


@pytest.mark.parametrize("arch", ["imagenet_preact_resnet18", "imagenet_preact_resnet50"])
@pytest.mark.parametrize("size", [224, 128])
def test_imagenet_output_shape(arch, size):
    model = build_model(arch, 7, 1 / 16).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_switched_off_bottleneck_is_identity_and_skips_compute():
    model = build_model("imagenet_preact_resnet50", 10, 1 / 16)
    block = model.layer3[1]
    assert isinstance(block, PreActBottleneck) and block.shortcut is None
    block.active = False
    x = torch.randn(2, block.bn1.num_features, 4, 4)
    calls = []
    for m in block.modules():
        if m is not block:
            m.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(block(x), x)
    assert calls == []


def test_bottleneck_scale_multiplies_the_residual_branch_only():
    model = build_model("imagenet_preact_resnet50", 10, 1 / 16).eval()
    block = model.layer3[1]
    x = torch.randn(2, block.bn1.num_features, 4, 4)
    full = block(x)
    block.scale = 0.25
    torch.testing.assert_close(block(x) - x, 0.25 * (full - x))


def test_bottleneck_subnetwork_forward_uses_only_its_blocks():
    model = build_model("imagenet_preact_resnet50", 10, 1 / 16)
    model.set_subnetwork([1, 4])
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    for i, block in enumerate(model.partitioned_blocks()):
        assert (block.conv3.weight.grad is not None) == (i in (1, 4))


def _analytic_cifar_flops(model: PreActResNet, active) -> float:
    """conv_flops as it was before it measured: 32x32 input, 3x3 stride-1 stem, maps 32/16/8/4 per stage."""
    flops, hw = 0.0, 32 * 32
    parts = model.partitioned_blocks()
    flops += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    flops += model.conv1.in_channels * model.conv1.out_channels * 9 * hw
    for stage, scale in ((model.layer1, 1), (model.layer2, 4), (model.layer3, 16), (model.layer4, 64)):
        for block in stage:
            if block in parts and parts.index(block) not in set(active):
                continue
            for conv in (block.conv1, block.conv2, block.shortcut):
                if conv is not None:
                    flops += (
                        conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] * hw / scale
                    )
    return flops


def test_conv_flops_of_cifar_models_is_unchanged():
    for arch, width in (
        ("preact_resnet18", 1),
        ("preact_resnet34", 1 / 8),
        ("preact_resnet101", 1),
        ("preact_resnet152", 1 / 4),
    ):
        model = _on_meta(arch, 100, width)
        n = len(model.partitioned_blocks())
        for active in (range(n), [], range(0, n, 3), [n - 1]):
            assert conv_flops(model, active) == conv_flops(model, active, 32) == _analytic_cifar_flops(model, active)


def test_conv_flops_of_imagenet_resnet50_is_the_standard_figure():
    model = _on_meta("imagenet_preact_resnet50", 1000)
    flops = conv_flops(model, range(5), 224)
    assert abs(flops - 4.1e9) / 4.1e9 < 0.03  # ~4.1 G multiply-adds (He et al.: 3.8e9 FLOPs for v1; v1.5 ~4.1e9)


def test_conv_flops_scales_with_the_input_area():
    model = _on_meta("imagenet_preact_resnet101", 1000, 1 / 16)
    classifier = model.linear.in_features * model.linear.out_features
    small, large = conv_flops(model, range(22), 224), conv_flops(model, range(22), 448)
    assert large - classifier == 4 * (small - classifier)  # every map doubles in both dimensions


def test_subnetwork_flop_ratio_falls_with_fewer_blocks():
    model = _on_meta("imagenet_preact_resnet101", 1000, 1 / 16)
    full = conv_flops(model, range(22), 224)
    ratios = [conv_flops(model, range(k), 224) / full for k in (22, 16, 11, 5, 0)]
    assert ratios[0] == 1.0
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    assert 0 < ratios[-1] < 1


def test_conv_flops_leaves_the_model_as_it_found_it():
    model = build_model("imagenet_preact_resnet50", 10, 1 / 16)
    model.set_full(0.5)
    model.layer3[2].active = False
    model.layer4.eval()
    states = [(b.active, b.scale) for b in model.partitioned_blocks()]
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    conv_flops(model, [0], 64)
    assert [(b.active, b.scale) for b in model.partitioned_blocks()] == states
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
