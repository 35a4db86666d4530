"""Datasets: official CIFAR-10/100 and SVHN files, a synthetic default, and an on-device loader.

Files are decoded once into uint8 arrays cached as .npy; a whole split then lives on the
training device, batches are taken by index and augmented there in one batched operation,
so the training loop never runs per-image Python. Nothing here knows about ranks beyond
(rank, world size) for sharding.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import HistError

DATASETS = ("cifar10", "cifar100", "svhn", "synthetic")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "synthetic": 10}
# Per-channel mean and std of the training sets (0-1 scale), for normalisation.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


@dataclass(frozen=True)
class Source:
    """Where the official files of one dataset live and how to fetch them."""
    folder: str                      # sub-folder of the data dir holding the files
    files: tuple[str, ...]           # files that must exist after download
    downloads: tuple[tuple[str, str, str], ...]  # (url, file name, md5)


SOURCES = {
    "cifar10": Source(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        (("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
          "c58f30108f718f92721af3b95e74349a"),)),
    "cifar100": Source(
        "cifar-100-python", ("train", "test"),
        (("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
          "eb9058c3a382ffc7106e4002c42a8d85"),)),
    "svhn": Source(
        "svhn", ("train_32x32.mat", "test_32x32.mat"),
        (("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat",
          "e26dedcc434d2e4c54c9b2d4a06d8373"),
         ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat",
          "eb5a983be6a315427106f1b164d9cef3"))),
}


def default_data_dir() -> Path:
    env = os.environ.get("HIST_DATA")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hist" / "data"


@dataclass
class Split:
    """One split as uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    images: np.ndarray
    labels: np.ndarray


# ---------------------------------------------------------------- official readers

class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the official CIFAR files hold: dicts, lists, bytes, str, ints and
    numpy arrays. Any other global (os.system, eval, a class of someone's choosing) is refused,
    so a crafted file in a shared data folder cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2 (only latin-1 is let through)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of a CIFAR file")
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            return _latin1_bytes
        try:  # numpy 2 moved it; the official files name the numpy 1 path
            from numpy._core.multiarray import _reconstruct
        except ImportError:
            from numpy.core.multiarray import _reconstruct
        return _reconstruct


def _latin1_bytes(text: str, encoding: str) -> bytes:
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused to encode with {encoding!r}: not part of a CIFAR file")
    return text.encode("latin1")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise HistError(f"missing data file {path}")
    except pickle.UnpicklingError as e:
        raise HistError(f"data file {path} is not an official CIFAR file ({e}); "
                        f"delete it and download the dataset again")
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, KeyError) as e:
        raise HistError(f"corrupt or truncated data file {path} ({type(e).__name__}: {e}); "
                        f"delete it and download the dataset again")


def _cifar_batch(path: Path, label_key: bytes) -> Split:
    d = _unpickle(path)
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except (KeyError, ValueError) as e:
        raise HistError(f"data file {path} is not a CIFAR batch ({type(e).__name__}: {e})")
    if len(images) != len(labels):
        raise HistError(f"data file {path} has {len(images)} images but {len(labels)} labels")
    return Split(images, labels)


def _concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


def read_cifar10(folder: Path, train: bool) -> Split:
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    return _concat([_cifar_batch(folder / n, b"labels") for n in names])


def read_cifar100(folder: Path, train: bool) -> Split:
    return _cifar_batch(folder / ("train" if train else "test"), b"fine_labels")


def read_svhn(folder: Path, train: bool) -> Split:
    import scipy.io
    path = folder / ("train_32x32.mat" if train else "test_32x32.mat")
    try:
        mat = scipy.io.loadmat(path)
        x, y = mat["X"], mat["y"]
    except FileNotFoundError:
        raise HistError(f"missing data file {path}")
    except Exception as e:  # scipy raises many types for a damaged file
        raise HistError(f"corrupt or truncated data file {path} ({type(e).__name__}: {e}); "
                        f"delete it and download it again")
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.reshape(-1).shape[0] != x.shape[3]:
        raise HistError(f"data file {path} has X of shape {x.shape} and y of shape {y.shape}; "
                        f"expected X 32x32x3xN and y Nx1 (SVHN format 2)")
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN stores the digit 0 as label 10
    return Split(np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), labels)


READERS = {"cifar10": read_cifar10, "cifar100": read_cifar100, "svhn": read_svhn}


def synthetic(seed: int, n_train: int = 4096, n_test: int = 1024, classes: int = 10) -> tuple[Split, Split]:
    """CIFAR-shaped, class-dependent images from the seed: a smooth per-class pattern plus noise."""
    rng = np.random.default_rng([seed, 0x5EED])
    coarse = rng.normal(size=(classes, 3, 4, 4))
    templates = np.kron(coarse, np.ones((1, 1, 8, 8)))  # (classes, 3, 32, 32)

    def draw(n: int) -> Split:
        labels = rng.integers(0, classes, size=n)
        noise = rng.normal(size=(n, 3, 32, 32))
        x = 128 + 40 * templates[labels] + 50 * noise
        return Split(np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.int64))

    return draw(n_train), draw(n_test)


# ---------------------------------------------------------------- locating, caching, downloading

def locate(dataset: str, data_dir: Path) -> Path:
    """The folder holding the official files: DATA_DIR/<folder> or DATA_DIR itself."""
    src = SOURCES[dataset]
    for cand in (data_dir / src.folder, data_dir):
        if all((cand / f).is_file() for f in src.files):
            return cand
    return data_dir / src.folder


def _missing_message(dataset: str, data_dir: Path, reason: str) -> str:
    src = SOURCES[dataset]
    urls = " ".join(u for u, _, _ in src.downloads)
    return (f"{dataset} files not found in {data_dir / src.folder} (expected {', '.join(src.files)}) "
            f"and the download failed ({reason}); fetch {urls} on a machine with internet, "
            f"unpack into {data_dir}, and pass --data-dir or set HIST_DATA")


def _progress(done: int, total: int, name: str) -> None:
    if total > 0 and sys.stderr.isatty():
        sys.stderr.write(f"\r{name}: {done / 2**20:.1f}/{total / 2**20:.1f} MiB ({100 * done // total}%)")
        sys.stderr.flush()


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Download to a temporary name, check the MD5, then rename atomically."""
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0)
        done = 0
        while chunk := r.read(1 << 20):
            f.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            _progress(done, total, dest.name)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if digest.hexdigest() != md5:
        tmp.unlink(missing_ok=True)
        raise HistError(f"download of {url} has MD5 {digest.hexdigest()}, expected {md5}; try again")
    os.replace(tmp, dest)


def download(dataset: str, data_dir: Path) -> None:
    """Fetch and unpack the official files; with several ranks, one downloads and the others wait."""
    src = SOURCES[dataset]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / f".{dataset}.download.lock", "w")
    except OSError as e:
        raise HistError(_missing_message(dataset, data_dir, f"cannot write to {data_dir}: {e.strerror}"))
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first rank downloads; the others block here
        if all((locate(dataset, data_dir) / f).is_file() for f in src.files):
            return
        for url, name, md5 in src.downloads:
            try:
                mirror = os.environ.get("HIST_MIRROR")  # a local mirror, for offline sites and tests
                _fetch(f"{mirror.rstrip('/')}/{name}" if mirror else url, data_dir / name, md5)
            except OSError as e:
                raise HistError(_missing_message(dataset, data_dir, str(getattr(e, "reason", e))))
            if name.endswith(".tar.gz"):
                with tarfile.open(data_dir / name) as tar:
                    tar.extractall(data_dir, filter="data")
                (data_dir / name).unlink()
            else:
                (data_dir / src.folder).mkdir(exist_ok=True)
                os.replace(data_dir / name, data_dir / src.folder / name)


def _cache_dir(folder: Path) -> Path:
    """Beside the data when writable, else in the user cache (the data may be read-only)."""
    beside = folder / ".hist-cache"
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    alt = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hist" / "decoded" / key
    alt.mkdir(parents=True, exist_ok=True)
    return alt


def _signature(folder: Path, files) -> str:
    return json.dumps([[f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns] for f in files])


def load_official(dataset: str, folder: Path, train: bool) -> Split:
    """Decode once into .npy files (keyed by the source files' sizes and times), then memory-map."""
    src = SOURCES[dataset]
    cache = _cache_dir(folder)
    tag = "train" if train else "test"
    sig_path = cache / f"{dataset}-{tag}.json"
    sig = _signature(folder, src.files)
    x_path, y_path = cache / f"{dataset}-{tag}-x.npy", cache / f"{dataset}-{tag}-y.npy"
    if sig_path.is_file() and sig_path.read_text() == sig and x_path.is_file() and y_path.is_file():
        return Split(np.load(x_path), np.load(y_path))
    split = READERS[dataset](folder, train)
    suffix = f".tmp{os.getpid()}.npy"
    for path, arr in ((x_path, split.images), (y_path, split.labels)):
        np.save(str(path) + suffix, arr)
        os.replace(str(path) + suffix, path)
    tmp = sig_path.with_name(sig_path.name + f".tmp{os.getpid()}")
    tmp.write_text(sig)
    os.replace(tmp, sig_path)
    return split


def load(dataset: str, data_dir: Path | None = None, seed: int = 0, download_ok: bool = True,
         synthetic_size: int = 4096) -> tuple[Split, Split]:
    """(train, test) for one dataset: the single entry point `hist-train` uses."""
    if dataset not in DATASETS:
        raise HistError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset == "synthetic":
        return synthetic(seed, synthetic_size, max(256, synthetic_size // 4))
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    folder = locate(dataset, data_dir)
    missing = [f for f in SOURCES[dataset].files if not (folder / f).is_file()]
    if missing:
        if not download_ok:
            raise HistError(_missing_message(dataset, data_dir, "downloads are off"))
        download(dataset, data_dir)
        folder = locate(dataset, data_dir)
    return load_official(dataset, folder, True), load_official(dataset, folder, False)


# ---------------------------------------------------------------- on-device batches

class DeviceLoader:
    """A whole split on the device; per-rank shards of a seeded per-epoch permutation.

    Each epoch, the permutation (identical on all ranks) is cut into `world` disjoint shards
    of floor(N / world) images; the remainder (< world images) sits out that epoch, and a
    different remainder sits out the next. Each shard gives floor(shard / batch) full batches;
    its last partial batch is dropped too, so every step of every rank has the same shape.
    """

    def __init__(self, split: Split, dataset: str, batch_size: int, device: torch.device,
                 seed: int, rank: int = 0, world: int = 1, augment: bool = True):
        self.images = torch.from_numpy(np.ascontiguousarray(split.images)).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        mean, std = STATS[dataset]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world = rank, world
        self.augment = augment
        self.flip = dataset != "svhn"  # digits are not mirror-symmetric
        self.shard_size = len(self.labels) // world
        self.steps_per_epoch = self.shard_size // batch_size
        if self.steps_per_epoch == 0:
            raise HistError(f"--batch-size {batch_size} is larger than the {self.shard_size} training "
                            f"images each of the {world} ranks gets; use a batch of at most {self.shard_size}")
        self._epoch, self._shard = -1, None

    def __len__(self) -> int:
        return len(self.labels)

    def shard(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.labels), generator=g)
            start = self.rank * self.shard_size
            self._shard = perm[start:start + self.shard_size].to(self.device)
            self._epoch = epoch
        return self._shard

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `step` of this rank's stream (epochs follow one another), augmented and normalised."""
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.shard(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        x = self.images[idx]
        if self.augment:
            g = torch.Generator(device=self.device).manual_seed(
                (self.seed * 7919 + self.rank) * 1_000_003 + step)
            x = augment_batch(x, g, self.flip)
        return self.normalise(x), self.labels[idx]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean) / self.std

    def calibration_batches(self, n_batches: int):
        """The same unaugmented batches on every rank (a fixed permutation of the whole split)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 - 1)
        order = torch.randperm(len(self.labels), generator=g).to(self.device)
        for i in range(min(n_batches, len(order) // self.batch_size)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.normalise(self.images[idx]), self.labels[idx]

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """Contiguous slice `rank` of the whole split, unaugmented, in batches."""
        n = len(self.labels)
        lo, hi = n * rank // world, n * (rank + 1) // world
        for s in range(lo, hi, batch_size):
            e = min(s + batch_size, hi)
            yield self.normalise(self.images[s:e]), self.labels[s:e]


def augment_batch(x: torch.Tensor, g: torch.Generator, flip: bool, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and (optionally) horizontal flip, batched on x's device."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n,1,h,1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n,1,1,w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    if flip:
        mirror = torch.rand(n, generator=g, device=x.device) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out
