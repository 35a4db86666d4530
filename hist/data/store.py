"""Where the files live: locating, downloading (MD5, temporary name, lock), and the .npy
decode cache that makes every later start read arrays instead of pickles."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from ..choices import ARRAY_DATASETS
from ..errors import HistError
from .meter import Meter
from .sources import READERS, SOURCES, Split, default_data_dir, synthetic


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
    return (
        f"{dataset} files not found in {data_dir / src.folder} (expected {', '.join(src.files)}) "
        f"and the download failed ({reason}); fetch {urls} on a machine with internet, "
        f"unpack into {data_dir}, and pass --data-dir or set HIST_DATA"
    )


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Download to a temporary name, check the MD5, then rename atomically."""
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        meter = Meter(f"downloading {url}", int(r.headers.get("Content-Length") or 0), "MiB", scale=2**20)
        while chunk := r.read(1 << 20):
            f.write(chunk)
            digest.update(chunk)
            meter.advance(len(chunk))
        meter.finish()
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


def synthetic_test_images(train_images: int, asked: int = 0) -> int:
    """Test images of the synthetic set: `asked` (`--synthetic-test-size`), or by default a
    quarter of the training images, at least 256. The training images are drawn first, so the
    test size never changes them."""
    return asked or max(256, train_images // 4)


def load(
    dataset: str,
    data_dir: Path | None = None,
    seed: int = 0,
    download_ok: bool = True,
    synthetic_size: int = 4096,
    synthetic_test_size: int = 0,
) -> tuple[Split, Split]:
    """(train, test) for one dataset: the single entry point `hist-train` uses."""
    if dataset not in ARRAY_DATASETS:
        raise HistError(f"unknown dataset {dataset!r}; choose one of {', '.join(ARRAY_DATASETS)}")
    if dataset == "synthetic":
        return synthetic(seed, synthetic_size, synthetic_test_images(synthetic_size, synthetic_test_size))
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    folder = locate(dataset, data_dir)
    missing = [f for f in SOURCES[dataset].files if not (folder / f).is_file()]
    if missing:
        if not download_ok:
            raise HistError(_missing_message(dataset, data_dir, "downloads are off"))
        download(dataset, data_dir)
        folder = locate(dataset, data_dir)
    return load_official(dataset, folder, True), load_official(dataset, folder, False)
