"""The examples of docs/api.md at a tiny size, as a user runs them: one process, horovodrun -np 2
and torchrun --nproc-per-node 2 (IST over the ViT's blocks; over ResNet-50's 12 shape-keeping
bottlenecks on the real Imagewoof sample)."""

import json

import pytest

from helpers import BIN, ROOT, horovodrun, run, torchrun

VIT = [ROOT / "examples" / "vit_cifar.py"]
VIT_TINY = "--train-images 256 --test-images 128 --epochs 1 --dim 32 --depth 4 --heads 2 --batch-size 32".split()
RESNET = [ROOT / "examples" / "resnet50_imagefolder.py"]
RESNET_TINY = "--width 0.0625 --crop 64 --resize 72 --train-images 64 --epochs 1 --batch-size 8 --bn-batches 2".split()
LAUNCHERS = {
    "one process": lambda *args: run([BIN / "python", *args], timeout=300),
    "horovodrun": lambda *args: horovodrun(2, BIN / "python", *args, timeout=300),
    "torchrun": lambda *args: torchrun(2, BIN / "python", *args, timeout=300),
}
ENGINES = {"one process": "local", "horovodrun": "horovod", "torchrun": "torch"}


def _result(proc) -> dict:
    """The last epoch's line (rank 0's; horovodrun tags it)."""
    lines = [line.split("<stdout>:", 1)[-1] for line in proc.stdout.splitlines() if '"epoch"' in line]
    return json.JSONDecoder().raw_decode(lines[-1][lines[-1].index("{") :])[0]  # horovodrun may append a tag


def _check(proc, launcher: str, accuracy_key: str) -> None:
    line = _result(proc)
    processes = 1 if launcher == "one process" else 2
    assert line["processes"] == processes and line["method"] == ("single" if processes == 1 else "ist")
    assert 0 < line["train_loss"] < 10 and 0 <= line[accuracy_key] <= 100
    assert f"engine {ENGINES[launcher]}" in proc.stdout


def _params(launcher):
    marks = [] if launcher == "one process" else [pytest.mark.multiprocess]
    return pytest.param(launcher, marks=marks, id=launcher.replace(" ", "-"))


@pytest.mark.parametrize("launcher", [_params(k) for k in LAUNCHERS])
def test_vit_cifar(launcher, cifar_sample, tmp_path):
    results = tmp_path / "results.jsonl"  # a flag horovodrun does not take for its own
    ends = ["--shared-ends", "1"] if launcher == "torchrun" else []  # 2 of the 4 blocks partitioned
    proc = LAUNCHERS[launcher](
        *VIT, "--data-dir", cifar_sample, *VIT_TINY, "--local-iters", "2", "--results", results, *ends
    )
    _check(proc, launcher, "test_accuracy")
    assert [json.loads(line)["epoch"] for line in results.read_text().splitlines()] == [1]


@pytest.mark.parametrize("launcher", [_params(k) for k in LAUNCHERS])
def test_resnet50_imagefolder(launcher, image_sample):
    proc = LAUNCHERS[launcher](*RESNET, "--data-dir", image_sample, *RESNET_TINY, "--local-iters", "2")
    _check(proc, launcher, "val_accuracy")
    assert "12 blocks" in proc.stdout
