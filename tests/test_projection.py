"""The latency-bandwidth projection: exact on hand-made numbers, sane on ResNet-101."""

import pytest

from hist.analysis.projection import Network, Workload, epoch_seconds, ist_subnets, project, workload_for


def test_collective_costs():
    net = Network(latency_s=1e-3, bandwidth_Bps=1e6)
    assert net.allreduce(1000, 4) == pytest.approx(6e-3 + 1.5 * 1000 / 1e6)
    assert net.allreduce(1000, 1) == 0
    assert net.send(500) == pytest.approx(1e-3 + 5e-4)


def test_epoch_time_formulas():
    w = Workload(
        step_s=0.1,
        images=1000,
        batch=10,
        local_iters=5,
        shared_bytes=100.0,
        block_bytes=(50.0,) * 4,
        shared_flop_share=0.5,
    )
    net = Network(1e-3, 1e4)
    assert epoch_seconds("single", 1, w, net) == pytest.approx(100 * 0.1)
    steps, rounds = 1000 / 20, 1000 / 20 / 5
    assert epoch_seconds("dp", 2, w, net) == pytest.approx(steps * (0.1 + net.allreduce(300, 2)))
    assert epoch_seconds("local-sgd", 2, w, net) == pytest.approx(steps * 0.1 + rounds * net.allreduce(300, 2))
    ist = steps * 0.1 * (0.5 + 0.5 * 2 / 4) + rounds * (net.allreduce(100, 2) + net.send(200 / 2 / 2))
    assert epoch_seconds("ist", 2, w, net) == pytest.approx(ist)
    assert ist_subnets(1024, 22) == 16 and ist_subnets(4, 22) == 4


def test_resnet101_projection_orders_the_methods():
    w = workload_for("preact_resnet101", 100, 1.0, step_s=0.1, images=50000, batch=128, local_iters=50)
    curves = project(w, Network())
    assert all(curves[m][1] == pytest.approx(1.0) for m in curves)
    assert curves["ist"][8] > 8 > curves["local-sgd"][8] > curves["dp"][8]  # more than linear for IST
    assert set(curves["ist"]) == {2**i for i in range(11)}


def test_points_beyond_the_data_or_the_published_batch_are_marked():
    from hist.analysis.projection import caveats

    w = workload_for("preact_resnet101", 10, 0.0625, step_s=0.1, images=50000, batch=128, local_iters=50)
    assert caveats(4, w) == []  # 97.7 steps a GPU, global batch 512
    assert caveats(8, w) == ["48.8 steps per GPU per epoch, fewer than one round of 50"]
    assert caveats(16, w)[0].startswith("24.4 steps per GPU per epoch")
    assert "global batch 2048 beyond the published 1024" in caveats(16, w)[1]
    assert len(caveats(1024, w)) == 2


def test_image_folder_runs_are_projected_at_their_crop():
    import torch

    from hist.models import build_model, conv_flops

    with torch.device("meta"):
        small = workload_for("imagenet_preact_resnet50", 10, 0.0625, 0.1, 9025, 64, 20, image_size=32)
        crop = workload_for("imagenet_preact_resnet50", 10, 0.0625, 0.1, 9025, 64, 20, image_size=128)
        model = build_model("imagenet_preact_resnet50", 10, 0.0625)
        expected = conv_flops(model, [], 128) / conv_flops(model, range(5), 128)
    assert crop.shared_flop_share == pytest.approx(expected)
    assert crop.shared_flop_share != pytest.approx(small.shared_flop_share)  # 32 pixels would mislead


def test_image_folders_default_to_the_imagenet_style_network():
    from hist.config import Config, default_arch

    assert default_arch("imagewoof") == "imagenet_preact_resnet101"
    assert default_arch("cifar10") == Config.arch == "preact_resnet101"
