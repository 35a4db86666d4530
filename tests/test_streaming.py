"""The streaming loader: DeviceLoader's sharding, batches that depend on (seed, rank, step) only,
the evaluation transform, decoding at reduced size, unreadable files, and worker processes
that start from any main program (MPI included) and end with the loader or the process."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hist import data
from hist.data.decode import crop_box, decode, draft, plan
from hist.errors import HistError

from helpers import mpirun

torch.set_num_threads(1)
CPU = torch.device("cpu")
MEAN, STD = (torch.tensor(v).view(1, 3, 1, 1) for v in data.STATS["imagewoof"])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HIST_CACHE", str(tmp_path / "cache"))


def small(split, workers=0, batch_size=8, seed=3, **kw):
    """Tiny crops keep decoding cheap: draft mode reads the sample's JPEGs at 1/8 scale."""
    return data.StreamingLoader(split, "imagewoof", batch_size, CPU, seed, crop=32, resize=36, workers=workers, **kw)


def pixels(x):
    """Normalised batch back to 0-255 (exact: the loader only normalised uint8 values)."""
    return (x * STD + MEAN).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent has not noticed


def test_shards_are_the_device_loaders(tmp_path):
    n = 103
    split = data.FolderSplit(tmp_path, tuple(f"{i}.png" for i in range(n)), np.zeros(n, np.int64), ("a",))
    train, _ = data.synthetic(0, n, 10)
    for rank in range(4):
        ours = small(split, seed=1, rank=rank, world=4)
        theirs = data.DeviceLoader(train, "synthetic", 8, CPU, 1, rank, 4)
        assert (ours.shard_size, ours.steps_per_epoch, len(ours)) == (25, 3, 103)
        for epoch in (0, 1, 7):
            assert ours.shard(epoch).tolist() == theirs.shard(epoch).tolist()
    shards = [small(split, seed=1, rank=r, world=4).shard(0).tolist() for r in range(4)]
    assert len(set(sum(shards, []))) == 100
    assert small(split, seed=1).shard(1).tolist() != small(split, seed=1).shard(0).tolist()
    with pytest.raises(HistError, match="batch size 200 exceeds"):
        small(split, batch_size=200).batch(0)


def test_training_batches_depend_on_seed_rank_and_step_only(image_sample):
    split = data.index_folder("imagewoof", image_sample, "train")
    inline = small(split)
    steps = [0, 1, 2, inline.steps_per_epoch]  # the last one opens epoch 1
    expected = [inline.batch(s) for s in steps]
    for x, y in expected:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(expected[0][1], torch.from_numpy(split.labels[inline.shard(0)[:8].numpy()]))
    assert torch.equal(expected[3][1], torch.from_numpy(split.labels[inline.shard(1)[:8].numpy()]))
    assert not torch.equal(expected[0][0], expected[1][0])
    assert not torch.equal(small(split, rank=1, world=2).batch(0)[0], small(split, rank=0, world=2).batch(0)[0])

    with small(split, workers=2) as workers:
        for s, (x, y) in zip(steps, expected):  # consecutive, then a jump into the next epoch
            xw, yw = workers.batch(s)
            assert torch.equal(xw, x) and torch.equal(yw, y)
        assert torch.equal(workers.batch(1)[0], expected[1][0])  # back again: the pipeline restarts
    resumed = small(split)  # a fresh loader resuming at step 2
    assert torch.equal(resumed.batch(2)[0], expected[2][0])
    assert not torch.equal(small(split, seed=4).batch(0)[0], expected[0][0])


def test_random_resized_crops_keep_area_and_ratio_in_range():
    for seed in range(200):
        rng = np.random.default_rng([seed, 0, 0, 0])
        left, top, w, h = crop_box(500, 375, rng)
        assert 0 <= left <= 500 - w and 0 <= top <= 375 - h
        assert 0.08 * 0.97 <= w * h / (500 * 375) <= 1.0 and 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    assert crop_box(500, 375, np.random.default_rng([1, 2, 3])) == crop_box(500, 375, np.random.default_rng([1, 2, 3]))
    # a strip no crop of the ratio range fits into: the centre, clamped to 3/4
    assert crop_box(10, 1000, np.random.default_rng(0)) == (0, (1000 - 13) // 2, 10, 13)


def write_tree(root, sizes):
    """val/<class>/ with random PNGs of the given sizes (PNG: no draft, an exact reference)."""
    files = []
    for i, size in enumerate(sizes):
        path = root / "val" / f"c{i % 2}" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
        (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "train" / f"c{i % 2}" / "x.png")
        files.append(path)
    return files


def reference(path, crop, resize):
    """Resize the shorter side to `resize`, then take the centre `crop` (torchvision's rule)."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - crop) / 2)), int(round((size[1] - crop) / 2))
    return np.asarray(img.crop((left, top, left + crop, top + crop)))


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_resizes_and_takes_the_centre_crop(tmp_path, workers):
    write_tree(tmp_path, [(50, 40), (37, 61), (64, 64), (45, 30), (90, 33)])
    split = data.index_folder("imagefolder", tmp_path, "val")
    loader = small(split, workers=workers, batch_size=2)
    batches = list(loader.eval_batches(2))
    assert [len(y) for _, y in batches] == [2, 2, 1] and batches[0][0].shape == (2, 3, 32, 32)
    images = np.concatenate([pixels(x) for x, _ in batches])
    for got, rel in zip(images, split.files):
        # one resize of the crop's box instead of two steps: the same filter taps, but a
        # value that falls exactly on .5 may round the other way (once per pass)
        diff = np.abs(got.astype(int) - reference(split.root / rel, 32, 36))
        assert diff.max() <= 2 and diff.mean() < 0.5
    assert torch.cat([y for _, y in batches]).tolist() == split.labels.tolist()
    # ranks read contiguous slices that together cover the split once
    slices = [torch.cat([y for _, y in loader.eval_batches(2, r, 2)]) for r in range(2)]
    assert [len(s) for s in slices] == [2, 3] and torch.cat(slices).tolist() == split.labels.tolist()
    # calibration: the same unaugmented batches whatever the rank
    calibration = [pixels(x) for x, _ in small(split, rank=1, world=2, batch_size=2).calibration_batches(5)]
    assert len(calibration) == 2
    assert all(np.array_equal(a, pixels(b)) for a, (b, _) in zip(calibration, loader.calibration_batches(5)))
    loader.close()


def test_the_centre_crop_is_where_resize_then_crop_puts_it(tmp_path):
    """A ramp (red = 2x, green = 3y) survives bilinear resizing exactly, so each output pixel
    tells which point of the original it came from."""
    y, x = np.mgrid[0:60, 0:100]
    ramp = np.stack([2 * x, 3 * y, np.full_like(x, 50)], -1).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    out = decode(str(tmp_path / "ramp.png"), 32, 36, None).astype(float)
    # shorter side 60 -> 36: scale 0.6, resized 60 x 36, centre crop at left 14, top 2
    centres_x = (14 + np.arange(32) + 0.5) / 0.6 - 0.5
    centres_y = (2 + np.arange(32) + 0.5) / 0.6 - 0.5
    assert np.abs(out[:, :, 0] - 2 * centres_x[None, :]).max() <= 1
    assert np.abs(out[:, :, 1] - 3 * centres_y[:, None]).max() <= 1
    assert (out[:, :, 2] == 50).all()


def test_greyscale_cmyk_palette_alpha_and_16_bit_images_come_out_rgb(tmp_path, image_sample):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 65536, size=(40, 50), dtype=np.uint16))
    cases = {
        "grey.jpg": rgb.convert("L"),
        "grey.png": rgb.convert("L"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "palette.png": rgb.convert("P"),
        "alpha.png": rgb.convert("RGBA"),
        "grey-alpha.png": rgb.convert("LA"),
        "grey16.png": grey16,
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = decode(str(tmp_path / name), 24, 28, (0, 0, 0, 0))
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8, name
    for name in ("grey.jpg", "grey.png", "grey16.png"):
        out = decode(str(tmp_path / name), 24, 28, None)
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2]), name
    real = image_sample / "train" / "n02086240" / "n02086240_10189.JPEG"  # one of the sample's greyscale photographs
    assert Image.open(real).mode == "L"
    out = decode(str(real), 32, 36, None)
    assert out.shape == (32, 32, 3) and np.array_equal(out[..., 0], out[..., 2]) and out.std() > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_one_line_naming_the_file(tmp_path, image_sample, workers):
    real = sorted((image_sample / "val" / "n02086240").iterdir())[0].read_bytes()
    for folder, bad, blob in (("train", "cut.JPEG", real[:100]), ("val", "notes.jpg", b"not an image\n")):
        (tmp_path / folder / "a").mkdir(parents=True)
        (tmp_path / folder / "a" / "good.JPEG").write_bytes(real)
        (tmp_path / folder / "a" / bad).write_bytes(blob)
    (tmp_path / "train" / "a" / "half.JPEG").write_bytes(real[: len(real) // 2])
    train = data.index_folder("imagefolder", tmp_path, "train")
    with small(train, workers=workers, batch_size=3) as loader:
        with pytest.raises(
            HistError, match=r"cannot decode image .*/train/a/(cut|half)\.JPEG .*remove or replace"
        ) as e:
            loader.batch(0)
        assert "\n" not in str(e.value)
    val = data.index_folder("imagefolder", tmp_path, "val")
    with small(val, workers=workers) as loader:
        with pytest.raises(HistError, match=r"cannot decode image .*/val/a/notes\.jpg .*remove or replace"):
            list(loader.eval_batches(2))


def test_large_jpegs_are_decoded_at_a_reduced_size_never_below_the_crop(tmp_path, image_sample):
    big = tmp_path / "big.jpg"
    smooth = np.random.default_rng(0).integers(0, 256, size=(18, 24, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((2400, 1800), Image.BILINEAR).save(big, quality=90)
    cases = [(big, 64, 73, None), (big, 224, 256, None), (image_sample / "val" / "n02086240", 64, 73, None)]
    cases += [(big, 224, 256, (seed, 0, 0, 0)) for seed in range(20)]
    scales = []
    for path, crop, resize, key in cases:
        path = sorted(path.iterdir())[0] if path.is_dir() else path
        with Image.open(path) as img:
            width, height = img.size
            box, _ = plan(width, height, crop, resize, key)
            scale = draft(img, box, crop)
            img.load()
            assert img.size == (math.ceil(width / scale), math.ceil(height / scale))
            assert (box[2] - box[0]) / scale >= crop and (box[3] - box[1]) / scale >= crop
            scales.append(scale)
    assert scales[:3] == [8, 4, 4] and max(scales[3:]) >= 2
    assert decode(str(big), 64, 73, None).shape == (64, 64, 3)


def test_close_ends_the_workers_and_a_killed_worker_is_reported(image_sample):
    split = data.index_folder("imagewoof", image_sample, "train")
    loader = small(split, workers=2)
    loader.batch(0)
    pids = [p.pid for p in loader._pool.procs]
    assert all(alive(pid) for pid in pids)
    loader.close()
    loader.close()
    assert not any(alive(pid) for pid in pids)

    loader = small(split, workers=1)
    loader.batch(0)
    os.kill(loader._pool.procs[0].pid, signal.SIGKILL)
    with pytest.raises(HistError, match=r"image decoding worker hist-decode-0 \(pid \d+\) was killed"):
        loader.batch(10)
    loader.close()


SCRIPT = """
import os, signal, sys
{mpi}
import torch
from hist.data import StreamingLoader, index_folder

def main():
    split = index_folder("imagewoof", sys.argv[1], "train")
    loader = StreamingLoader(split, "imagewoof", 8, torch.device("cpu"), 3, crop=32, resize=36, workers=2)
    x, _ = loader.batch(0)
    # one write: mpirun's --tag-output may tag print()'s separate newline as a line of its own
    sys.stdout.write(" ".join(str(p.pid) for p in loader._pool.procs) + " " + repr(float(x.double().sum())) + "\\n")
    sys.stdout.flush()
    if sys.argv[2] == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    # no close(): the workers end with the process

if __name__ == "__main__":
    main()
"""


def expected_sum(split):
    return float(small(split).batch(0)[0].double().sum())


@pytest.mark.parametrize("ending", ["exits", "killed"])
def test_workers_start_from_a_script_and_end_with_it(tmp_path, image_sample, ending):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.format(mpi=""))
    env = dict(os.environ, HIST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, script, image_sample, ending], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == (0 if ending == "exits" else -signal.SIGKILL), proc.stderr
    *pids, total = proc.stdout.split()
    assert float(total) == expected_sum(data.index_folder("imagewoof", image_sample, "train"))
    deadline = time.time() + 10  # orphans notice their parent is gone within a second
    while any(alive(int(p)) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(int(p)) for p in pids)


@pytest.mark.multiprocess
def test_workers_start_after_mpi_init(tmp_path, image_sample):
    """Open MPI does not survive fork() after MPI_Init; the workers are spawned, and do not
    re-run the main script (whose `import mpi4py` would call MPI_Init again in each)."""
    script = tmp_path / "mpi_script.py"
    script.write_text(SCRIPT.format(mpi="from mpi4py import MPI; assert MPI.Is_initialized()"))
    proc = mpirun(2, sys.executable, script, image_sample, "exits", timeout=180, HIST_CACHE=tmp_path / "cache")
    lines = proc.stdout.split("\n")
    sums = {float(line.split()[-1]) for line in lines if line.strip()}
    assert len([line for line in lines if line.strip()]) == 2
    assert sums == {expected_sum(data.index_folder("imagewoof", image_sample, "train"))}
