"""Readers of the official formats, the synthetic set, the cache, sharding and augmentation."""

import hashlib
import http.server
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from hist import data
from hist.config import Config
from hist.errors import HistError
from hist.launch import build_loaders


def write_cifar(folder: Path, names, n, label_key, rng):
    """Files in the official layout: protocol-2 pickles with byte-string keys."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name in names:
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, 100, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", label_key: y, b"data": x, b"filenames": [b"f"] * n}, f, protocol=2)
        truth[name] = (x, y)
    return truth


def test_cifar10_reader_returns_the_files_exactly(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    truth = write_cifar(tmp_path / "cifar-10-batches-py", names, 7, b"labels", rng)
    train, test = data.load("cifar10", tmp_path, download_ok=False)
    assert train.images.shape == (35, 3, 32, 32) and train.images.dtype == np.uint8
    x, y = truth["data_batch_3"]
    assert np.array_equal(train.images[14:21].reshape(7, -1), x)
    assert train.labels[14:21].tolist() == y
    assert np.array_equal(test.images.reshape(7, -1), truth["test_batch"][0])
    # pixel (row 0, col 1) of the green plane is byte 1024 + 1 of the row
    assert train.images[0, 1, 0, 1] == truth["data_batch_1"][0][0, 1025]


def test_cifar100_reader_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    truth = write_cifar(tmp_path / "cifar-100-python", ["train", "test"], 5, b"fine_labels", rng)
    train, test = data.load("cifar100", tmp_path, download_ok=False)
    assert train.labels.tolist() == truth["train"][1]
    assert np.array_equal(test.images.reshape(5, -1), truth["test"][0])


def test_svhn_reader_transposes_and_maps_ten_to_zero(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "svhn"
    folder.mkdir()
    for split in ("train", "test"):
        X = rng.integers(0, 256, size=(32, 32, 3, 6), dtype=np.uint8)
        y = np.array([[10], [1], [2], [10], [9], [5]], dtype=np.uint8)
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": X, "y": y})
    train, _ = data.load("svhn", tmp_path, download_ok=False)
    X = scipy.io.loadmat(folder / "train_32x32.mat")["X"]
    assert train.labels.tolist() == [0, 1, 2, 0, 9, 5]
    assert np.array_equal(train.images[4], X[:, :, :, 4].transpose(2, 0, 1))


def test_svhn_wrong_shape_names_the_file(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    for split in ("train", "test"):
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": np.zeros((8, 8, 3, 2), np.uint8), "y": np.zeros((2, 1))})
    with pytest.raises(HistError, match="train_32x32.mat.*shape"):
        data.load("svhn", tmp_path, download_ok=False)


def test_real_cifar10_sample(cifar_sample):
    train, test = data.load("cifar10", cifar_sample, download_ok=False)
    assert train.images.shape == (4577, 3, 32, 32) and test.images.shape == (508, 3, 32, 32)
    assert set(np.unique(train.labels)) == set(range(10))
    with open(cifar_sample / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert np.array_equal(train.images[1017:2034].reshape(1017, -1), raw["data"])
    assert train.labels[1017:2034].tolist() == raw["labels"]


def test_truncated_pickle_names_the_file(tmp_path, cifar_sample):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    src = cifar_sample / "cifar-10-batches-py"
    for f in src.iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    blob = (src / "data_batch_4").read_bytes()
    (folder / "data_batch_4").write_bytes(blob[: len(blob) // 2])  # ends inside the data array
    with pytest.raises(HistError, match="data_batch_4.*(corrupt|truncated)"):
        data.load("cifar10", tmp_path, download_ok=False)


def test_missing_files_offline_say_where_and_what(tmp_path):
    with pytest.raises(HistError) as e:
        data.load("cifar100", tmp_path, download_ok=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python") in msg and "train, test" in msg and "HIST_DATA" in msg


def test_decoded_cache_is_reused_and_refreshed(tmp_path):
    rng = np.random.default_rng(3)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    write_cifar(tmp_path / "cifar-10-batches-py", names, 3, b"labels", rng)
    data.load("cifar10", tmp_path, download_ok=False)
    cache = tmp_path / "cifar-10-batches-py" / ".hist-cache"
    assert (cache / "cifar10-train-x.npy").is_file()
    truth = write_cifar(tmp_path / "cifar-10-batches-py", ["test_batch"], 4, b"labels", rng)
    _, test = data.load("cifar10", tmp_path, download_ok=False)
    assert np.array_equal(test.images.reshape(4, -1), truth["test_batch"][0])


def test_download_from_a_mirror_checks_md5_and_unpacks(tmp_path, monkeypatch):
    """A real HTTP download over loopback (the official site is unreachable here)."""
    rng = np.random.default_rng(4)
    staging = tmp_path / "staging"
    write_cifar(
        staging / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], 2, b"labels", rng
    )
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5((served / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        src = data.SOURCES["cifar10"]
        monkeypatch.setitem(
            data.SOURCES, "cifar10", data.Source(src.folder, src.files, (("unused", "cifar-10-python.tar.gz", md5),))
        )
        monkeypatch.setenv("HIST_MIRROR", f"http://127.0.0.1:{server.server_port}")
        train, _ = data.load("cifar10", tmp_path / "data")
        assert train.images.shape == (10, 3, 32, 32)
        assert not list((tmp_path / "data").glob("*.part*"))
        # a wrong checksum is refused and leaves nothing behind
        monkeypatch.setitem(
            data.SOURCES,
            "cifar100",
            data.Source("cifar-100-python", ("train", "test"), (("unused", "cifar-10-python.tar.gz", "0" * 32),)),
        )
        with pytest.raises(HistError, match="MD5"):
            data.load("cifar100", tmp_path / "data")
        assert not list((tmp_path / "data").glob("*.part*"))
    finally:
        server.shutdown()


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b = data.load("synthetic", seed=5, synthetic_size=300), data.load("synthetic", seed=5, synthetic_size=300)
    assert np.array_equal(a[0].images, b[0].images) and np.array_equal(a[1].labels, b[1].labels)
    assert a[0].images.shape == (300, 3, 32, 32) and a[1].images.shape[0] == 256
    c = data.load("synthetic", seed=6, synthetic_size=300)
    assert not np.array_equal(a[0].images, c[0].images)
    # class means differ far more than noise: a nearest-mean classifier beats chance by far
    x, y = a[0].images.reshape(300, -1).astype(float), a[0].labels
    means = np.stack([x[y == k].mean(0) for k in range(10)])
    pred = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y).mean() > 0.5


def test_synthetic_test_size_is_asked_for_and_leaves_the_training_images_alone():
    train, test = data.load("synthetic", seed=5, synthetic_size=300)
    train_big, test_big = data.load("synthetic", seed=5, synthetic_size=300, synthetic_test_size=2048)
    assert len(test) == 256 and len(test_big) == 2048
    assert np.array_equal(train.images, train_big.images) and np.array_equal(train.labels, train_big.labels)


def test_shards_are_disjoint_equal_and_reshuffled_each_epoch():
    train, _ = data.synthetic(0, 103, 10)
    loaders = [data.DeviceLoader(train, "synthetic", 8, torch.device("cpu"), 1, r, 4) for r in range(4)]
    shards = [l.shard(0).tolist() for l in loaders]
    flat = sum(shards, [])
    assert all(len(s) == 25 for s in shards) and len(set(flat)) == 100
    assert loaders[0].steps_per_epoch == 3
    assert loaders[0].shard(1).tolist() != shards[0]


@pytest.mark.parametrize(
    "dataset,shifts,flips", [("cifar10", True, True), ("svhn", True, False), ("synthetic", False, False)]
)
def test_training_batches_are_augmented_only_where_it_keeps_the_class(dataset, shifts, flips):
    """hist-train's training batches: a digit's mirror image is not that digit; a synthetic class
    is a pattern at fixed places and orientation, which neither a shift nor a flip keeps, so its
    training images stay plain."""
    x = (torch.arange(64 * 3 * 32 * 32) % 251).to(torch.uint8).reshape(64, 3, 32, 32).numpy()
    split = data.Split(x, np.zeros(64, dtype=np.int64))
    loader, _ = build_loaders(Config(dataset=dataset, batch_size=64), split, split, torch.device("cpu"), 0, 1)
    batch, _ = loader.batch(0)
    padded = torch.nn.functional.pad(torch.from_numpy(x)[loader.shard(0)[:64]], (4, 4, 4, 4))
    shifted = mirrored = 0
    for i in range(64):
        crops = {
            (dy, dx): loader.normalise(padded[i : i + 1, :, dy : dy + 32, dx : dx + 32])
            for dy in range(9)
            for dx in range(9)
        }
        (dy, dx), flipped = next(
            (k, f)
            for f in (False, True)
            for k, c in crops.items()
            if torch.equal(batch[i : i + 1], c.flip(3) if f else c)
        )
        shifted += (dy, dx) != (4, 4)
        mirrored += flipped
    assert (shifted > 10, mirrored > 10) == (shifts, flips), (shifted, mirrored)


def test_augmentation_crops_from_the_padded_image_and_flips():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.uint8).reshape(2, 3, 32, 32) % 251
    g = torch.Generator().manual_seed(0)
    out = data.augment_batch(x, g, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        found = any(
            torch.equal(out[i], padded[i, :, dy : dy + 32, dx : dx + 32])
            or torch.equal(out[i], padded[i, :, dy : dy + 32, dx : dx + 32].flip(2))
            for dy in range(9)
            for dx in range(9)
        )
        assert found


def test_batches_are_normalised_and_deterministic():
    train, _ = data.synthetic(0, 64, 10)
    a = data.DeviceLoader(train, "synthetic", 16, torch.device("cpu"), 3)
    b = data.DeviceLoader(train, "synthetic", 16, torch.device("cpu"), 3)
    xa, ya = a.batch(5)
    xb, yb = b.batch(5)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == torch.float32
    # a batch larger than a rank's shard gives no step (hist-train refuses it with one line)
    assert data.DeviceLoader(train, "synthetic", 100, torch.device("cpu"), 0, 0, 2).steps_per_epoch == 0
