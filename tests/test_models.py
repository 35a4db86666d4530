import torch

from hist.models import PreActResNet, build_model, shared_and_partitioned


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
