"""--data-split: sharded epochs against every rank on the whole set, in both loaders, the
schedule that counts its epochs, exact resume, the presets, the suite and the projection."""

import json

import h5py
import numpy as np
import pytest
import torch

from hist import data
from hist.analysis.projection import Network, Workload, epoch_seconds
from hist.config import Config
from hist.data.order import epoch_shard, images_per_rank, order_seed
from hist.engine import lr_scaling, peak_lr
from hist.errors import HistError
from hist.presets import PRESETS

from helpers import TINY_RUN

CPU = torch.device("cpu")


def test_full_gives_every_rank_the_whole_set_in_its_own_order():
    n = 103
    orders = [epoch_shard(n, 1, 0, r, 4, "full") for r in range(4)]
    assert all(sorted(o.tolist()) == list(range(n)) for o in orders)
    assert len({tuple(o.tolist()) for o in orders}) == 4  # each rank its own order
    assert epoch_shard(n, 1, 1, 0, 4, "full").tolist() != orders[0].tolist()  # reshuffled each epoch
    assert epoch_shard(n, 2, 0, 0, 4, "full").tolist() != orders[0].tolist()  # and per seed
    # rank 0's order is the shared one: one process is the same run under both splits
    assert orders[0].tolist() == epoch_shard(n, 1, 0, 0, 1, "shard").tolist()
    assert (images_per_rank(n, 4, "full"), images_per_rank(n, 4, "shard")) == (103, 25)
    # no two (epoch, rank) of one seed share a generator seed
    seeds = {order_seed(s, e, r) for s in (0, 7) for e in range(200) for r in range(64)}
    assert len(seeds) == 2 * 200 * 64


def test_both_loaders_draw_the_same_full_epochs(tmp_path):
    n = 103
    train, _ = data.synthetic(0, n, 10)
    split = data.FolderSplit(tmp_path, tuple(f"{i}.png" for i in range(n)), np.zeros(n, np.int64), ("a",))
    for rank in range(2):
        device = data.DeviceLoader(train, "synthetic", 8, CPU, 1, rank, 2, data_split="full")
        streamed = data.StreamingLoader(split, "imagewoof", 8, CPU, 1, rank, 2, data_split="full", workers=0)
        assert device.steps_per_epoch == streamed.steps_per_epoch == n // 8  # not n // 2 // 8
        for epoch in (0, 3):
            assert device.shard(epoch).tolist() == streamed.shard(epoch).tolist()


def test_lr_scaling_auto_follows_the_split_and_the_presets_follow_the_release():
    assert lr_scaling(Config(data_split="shard")) == "linear" and peak_lr(Config(data_split="shard"), 4) == 0.4
    assert lr_scaling(Config(data_split="full")) == "none" and peak_lr(Config(data_split="full"), 4) == 0.1
    assert peak_lr(Config(data_split="full", lr_scaling="linear"), 4) == pytest.approx(0.4)  # asked for: given
    paper = PRESETS["paper"][1]
    assert (paper["data_split"], paper["optimizer_state"], paper["lr_scaling"]) == ("full", "restart", "none")
    with pytest.raises(HistError, match="--data-split 'halves'"):
        Config(data_split="halves").validate()


def test_the_projection_does_not_divide_a_full_epoch_by_the_gpus():
    kw = dict(step_s=0.1, images=1000, batch=10, local_iters=5, shared_bytes=0.0, block_bytes=(0.0,) * 4)
    shard, full = Workload(**kw, shared_flop_share=1.0), Workload(**kw, shared_flop_share=1.0, data_split="full")
    net = Network(0.0, 1e12)
    assert epoch_seconds("local-sgd", 4, shard, net) == pytest.approx(100 * 0.1 / 4)
    assert epoch_seconds("local-sgd", 4, full, net) == pytest.approx(100 * 0.1)


def test_a_suite_folder_refuses_the_other_split(tmp_path):
    from hist.analysis.suite import run_suite

    folder = tmp_path / "suite"
    settings = {"resolved": Config(dataset="synthetic", data_split="shard").as_dict(), "dataset": "synthetic"}
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(HistError, match="other settings"):
        run_suite("synthetic", "smoke", folder, [2], ["ist"], [0], [], Config(dataset="synthetic", data_split="full"))
    assert not list(folder.glob("*.h5"))  # refused before any run


TINY = TINY_RUN


@pytest.mark.multiprocess
@pytest.mark.slow
def test_full_split_run_counts_its_epochs_records_the_protocol_and_resumes_exactly(tmp_path):
    from test_train import cut_and_resume, rounds, same_model

    args = ["synthetic", "--epochs", "2", *TINY, "--checkpoint-every", "2", "--data-split", "full"]
    args += ["--eval-every-epochs", "1", "--warmup-local-sgd-epochs", "0.5"]
    ref, out, a, b = cut_and_resume(tmp_path, *args)
    assert same_model(a["model"], b["model"])
    r, e, attrs = rounds(out)
    assert np.array_equal(rounds(ref)[0]["loss"], r["loss"])
    # 512 images, batch 32: 16 steps a rank per epoch (not 8), 2 epochs in 4-step rounds
    assert (attrs["data_split"], attrs["steps_per_epoch"], attrs["lr_scaling"]) == ("full", 16, "none")
    assert r["round"].tolist() == list(range(8)) and r["epoch"][-1] == pytest.approx(2.0)
    assert e["epoch"].tolist() == [1.0, 2.0]  # --eval-every-epochs counts full epochs
    with h5py.File(out) as f:
        assert json.loads(f.attrs["config"])["data_split"] == "full"
    # the other protocol cannot resume this checkpoint: the resume decision on the run's own file,
    # in this process (a 2-rank launch to hear the refusal decides nothing more)
    from hist.errors import CollectiveError
    from hist.launch import Checked, load_resume_state

    checked = Checked(2, out, out.with_suffix(".ckpt.pt"), torch.device("cpu"), "horovod")
    identity = {**b["identity"], "data_split": "shard"}
    with pytest.raises(CollectiveError, match="data_split='full', this run has data_split='shard'"):
        load_resume_state(Config(resume=True, data_split="shard"), checked, identity)
    assert load_resume_state(Config(resume=True), checked, b["identity"])["round"] == b["round"]
