"""The datasets: official CIFAR-10/100 and SVHN files and how to read them safely, and a
synthetic set. A reader returns uint8 images (N, 3, 32, 32) and int64 labels; nothing here
knows about devices, caches or ranks.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import HistError
from .folders import FOLDER_NUM_CLASSES, FOLDER_STATS, FolderSplit

# The image-folder sets (hist.data.folders) are folded in; `imagefolder` has as many classes as
# its train/ has folders, so only `num_classes` knows it.
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "synthetic": 10, **FOLDER_NUM_CLASSES}
# Training augments the 32x32 sets with a random crop of the 4-pixel zero-padded image and a
# horizontal flip. Digits are not mirror-symmetric, so SVHN is never flipped. A synthetic class is
# a pattern at fixed places and orientation, which neither a shift nor a flip keeps: augmented,
# its training images showed patterns no test image has, and one process lost up to 14 points
# on the plain test images late in a run while it kept fitting the augmented ones
# (docs/timings.md, issue 37), so hist-train does not augment the synthetic set at all.
UNFLIPPED = frozenset({"svhn"})
UNAUGMENTED = frozenset({"synthetic"})
# Per-channel mean and std of the training sets (0-1 scale), for normalisation.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    **FOLDER_STATS,
}


def num_classes(dataset: str, split: FolderSplit | None = None) -> int:
    """Outputs the model needs: known in advance, or (a generic image folder) counted in its index."""
    if split is not None and dataset not in NUM_CLASSES:
        return split.num_classes
    if dataset not in NUM_CLASSES:
        raise HistError(f"the number of classes of {dataset!r} is known only once its folders are indexed")
    return NUM_CLASSES[dataset]


@dataclass(frozen=True)
class Source:
    """Where the official files of one dataset live and how to fetch them."""

    folder: str  # sub-folder of the data dir holding the files
    files: tuple[str, ...]  # files that must exist after download
    downloads: tuple[tuple[str, str, str], ...]  # (url, file name, md5)


SOURCES = {
    "cifar10": Source(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        (
            (
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
            ),
        ),
    ),
    "cifar100": Source(
        "cifar-100-python",
        ("train", "test"),
        (
            (
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
            ),
        ),
    ),
    "svhn": Source(
        "svhn",
        ("train_32x32.mat", "test_32x32.mat"),
        (
            (
                "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                "train_32x32.mat",
                "e26dedcc434d2e4c54c9b2d4a06d8373",
            ),
            (
                "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                "test_32x32.mat",
                "eb5a983be6a315427106f1b164d9cef3",
            ),
        ),
    ),
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

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------- official readers


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the official CIFAR files hold: dicts, lists, bytes, str, ints and
    numpy arrays. Any other global (os.system, eval, a class of someone's choosing) is refused,
    so a crafted file in a shared data folder cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
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
        raise HistError(
            f"data file {path} is not an official CIFAR file ({e}); delete it and download the dataset again"
        )
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, KeyError) as e:
        raise HistError(
            f"corrupt or truncated data file {path} ({type(e).__name__}: {e}); delete it and download the dataset again"
        )


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
        raise HistError(
            f"corrupt or truncated data file {path} ({type(e).__name__}: {e}); delete it and download it again"
        )
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.reshape(-1).shape[0] != x.shape[3]:
        raise HistError(
            f"data file {path} has X of shape {x.shape} and y of shape {y.shape}; "
            f"expected X 32x32x3xN and y Nx1 (SVHN format 2)"
        )
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
