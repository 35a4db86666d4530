"""Image-folder datasets (ImageNet and its subsets, any `train/<class>/*.jpg` tree): the index of
their files and labels, cached next to the data so that a set of millions of files is listed
once, not by every rank at every start. Nothing here decodes an image."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..choices import FOLDER_DATASETS
from ..errors import HistError
from .meter import Meter

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Two classes a public copy of Tiny-ImageNet adds (in wnids.txt and val too) beyond the standard 200.
TINY_IMAGENET_EXTRA = frozenset({"n02480855", "n10148035"})
CACHE_FORMAT = 1
# A folder changed this recently may change again within its file system's mtime resolution
# (1 s on some shared file systems) without its mtime moving: such an index is not cached.
RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class FolderLayout:
    """How one named dataset is laid out on disk, and what is known of it in advance."""

    num_classes: int | None  # None: as many as DIR/train has class folders
    tiny_imagenet: bool = False  # train/<wnid>/images/*, val/images/* with val_annotations.txt
    stats: tuple = IMAGENET_STATS


LAYOUTS = {
    "imagefolder": FolderLayout(None),
    "imagenet": FolderLayout(1000),
    "imagenette": FolderLayout(10),
    "imagewoof": FolderLayout(10),
    "tiny-imagenet": FolderLayout(200, tiny_imagenet=True),
}
assert tuple(LAYOUTS) == FOLDER_DATASETS
FOLDER_STATS = {name: layout.stats for name, layout in LAYOUTS.items()}
FOLDER_NUM_CLASSES = {name: layout.num_classes for name, layout in LAYOUTS.items() if layout.num_classes}


@dataclass(frozen=True, eq=False)
class FolderSplit:
    """One split of an image-folder set: image paths (relative to `root`) and int64 labels, the
    index into `classes` (the sorted training classes, shared by both splits)."""

    root: Path
    files: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def index_folder(dataset: str, data_dir: Path | str, split: str) -> FolderSplit:
    """The index of DATA_DIR/<split> ("train" or "val"), from the cache when the folders have
    not changed since it was written (a stat per class folder, no listing), else listed anew."""
    if dataset not in LAYOUTS:
        raise HistError(f"unknown image-folder dataset {dataset!r}; choose one of {', '.join(FOLDER_DATASETS)}")
    if split not in ("train", "val"):
        raise HistError(f"unknown split {split!r}; choose train or val")
    layout = LAYOUTS[dataset]
    data_dir = Path(data_dir).absolute()
    kind = "tiny-imagenet" if layout.tiny_imagenet else "folders"
    _check_top(data_dir, kind)
    caches = _cache_paths(data_dir, kind, split)
    found = _first_valid(caches, data_dir, kind, split)
    if found is None:
        with _lock(caches):
            found = _first_valid(caches, data_dir, kind, split)  # another rank may have just built it
            if found is None:
                started = time.time_ns()
                build = _build_tiny_imagenet if layout.tiny_imagenet else _build_folders
                found = build(data_dir, split)
                if all(s is None or s[0] < started - RACY_NS for s in found["signature"].values()):
                    _write_cache(caches, {"format": CACHE_FORMAT, "kind": kind, "split": split, **found})
    classes = tuple(found["classes"])
    if layout.num_classes is not None and len(classes) != layout.num_classes:
        wnids = data_dir / "wnids.txt"
        where = f"{wnids} names" if layout.tiny_imagenet and wnids.is_file() else f"{data_dir / 'train'} has"
        raise HistError(
            f"{where} {len(classes)} classes but {dataset} has {layout.num_classes}; "
            f"point --data-dir at the full {dataset}, or train on it as `imagefolder`"
        )
    return FolderSplit(
        data_dir / split, tuple(found["files"]), np.asarray(found["labels"], dtype=np.int64).reshape(-1), classes
    )


# ---------------------------------------------------------------- listing


def _check_top(data_dir: Path, kind: str) -> None:
    expected = (
        "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
        if kind == "tiny-imagenet"
        else "train/<class>/<image> and val/<class>/<image>"
    )
    if not data_dir.is_dir():
        raise HistError(f"data folder {data_dir} does not exist; pass --data-dir the folder that holds {expected}")
    for sub in ("train", "val"):
        if not (data_dir / sub).is_dir():
            raise HistError(f"missing folder {data_dir / sub}; --data-dir must hold {expected}")


def _stamp(path: Path) -> list | None:
    """What changes when a folder gains or loses an entry, or a file is rewritten; None if absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_mtime_ns] if stat.S_ISDIR(st.st_mode) else [st.st_mtime_ns, st.st_size]


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".")]  # .DS_Store, ._x.JPEG from macOS
    except OSError as e:
        raise HistError(f"cannot list {folder}: {e.strerror or e}")


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in _scandir(split_dir) if e.is_dir())


def _images(folder: Path, what: str = "class folder") -> list[str]:
    names = sorted(e.name for e in _scandir(folder) if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
    if not names:
        nested = any(e.is_dir() for e in _scandir(folder))
        hint = (
            " (images in its sub-folders are not read; train/<wnid>/images/ is the tiny-imagenet layout)"
            if nested
            else ""
        )
        raise HistError(f"{what} {folder} holds no images (.jpg, .jpeg or .png){hint}; add its images or remove it")
    return names


def _train_classes(data_dir: Path) -> list[str]:
    classes = _class_folders(data_dir / "train")
    if not classes:
        raise HistError(f"{data_dir / 'train'} has no class folders; expected {data_dir / 'train'}/<class>/<image>")
    return classes


def _build_folders(data_dir: Path, split: str) -> dict:
    """ImageFolder layout: <split>/<class>/<image>; classes are the sorted folders of train/."""
    classes = _train_classes(data_dir)
    signature = {"train": _stamp(data_dir / "train")}
    folders = classes if split == "train" else _class_folders(data_dir / split)
    if not folders:
        raise HistError(f"{data_dir / split} has no class folders; expected {data_dir / split}/<class>/<image>")
    known = set(classes)
    unknown = [f for f in folders if f not in known]
    if unknown:
        shown = ", ".join(str(data_dir / split / f) for f in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise HistError(
            f"{len(unknown)} folder(s) of {data_dir / split} are not classes of {data_dir / 'train'} ({shown}): "
            f"the split is mislabelled; rename or remove them"
        )
    label_of = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    meter = Meter(f"indexing {data_dir / split} (once; cached after)", len(folders), "class folders")
    for folder in folders:
        signature[f"{split}/{folder}"] = _stamp(data_dir / split / folder)
        names = _images(data_dir / split / folder)
        files += [f"{folder}/{n}" for n in names]
        labels += [label_of[folder]] * len(names)
        meter.advance(1, images=len(files))
    meter.finish()
    signature[split] = _stamp(data_dir / split)
    return {"signature": signature, "classes": classes, "files": files, "labels": labels}


def _tiny_imagenet_classes(data_dir: Path) -> tuple[list[str], dict]:
    """The 200 wnids: from wnids.txt when present, else the train folders; sorted either way."""
    wnids = data_dir / "wnids.txt"
    signature = {"train": _stamp(data_dir / "train"), "wnids.txt": _stamp(wnids)}
    if signature["wnids.txt"] is not None:
        try:
            names = wnids.read_text().split()
        except (OSError, UnicodeDecodeError) as e:
            raise HistError(f"cannot read {wnids} ({e}); restore it or delete it to use the train folders")
    else:
        names = _class_folders(data_dir / "train")
    classes = sorted(set(names) - TINY_IMAGENET_EXTRA)
    if not classes:
        raise HistError(f"no classes in {wnids if signature['wnids.txt'] else data_dir / 'train'}")
    return classes, signature


def _build_tiny_imagenet(data_dir: Path, split: str) -> dict:
    """Tiny-ImageNet: train/<wnid>/images/*; val/images/* labelled by val/val_annotations.txt."""
    classes, signature = _tiny_imagenet_classes(data_dir)
    label_of = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    if split == "train":
        for wnid in classes:
            folder = data_dir / "train" / wnid / "images"
            if not folder.is_dir():
                raise HistError(f"missing folder {folder} of class {wnid}; Tiny-ImageNet keeps train/<wnid>/images/*")
            signature[f"train/{wnid}/images"] = _stamp(folder)
            names = _images(folder)
            files += [f"{wnid}/images/{n}" for n in names]
            labels += [label_of[wnid]] * len(names)
    else:
        notes, images = data_dir / "val" / "val_annotations.txt", data_dir / "val" / "images"
        if not notes.is_file() or not images.is_dir():
            raise HistError(f"missing {notes if not notes.is_file() else images}; Tiny-ImageNet's val/ holds both")
        signature["val/val_annotations.txt"], signature["val/images"] = _stamp(notes), _stamp(images)
        present = set(_images(images, "folder"))
        try:
            lines = notes.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise HistError(f"cannot read {notes} ({e}); restore it from the Tiny-ImageNet archive")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise HistError(f"{notes} line {number} is not '<file>\\t<wnid>\\t...'; restore the file")
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in label_of:
                if wnid in TINY_IMAGENET_EXTRA:
                    continue
                raise HistError(f"{notes} line {number} labels {name} with {wnid}, which is not a training class")
            if name not in present:
                raise HistError(f"{notes} line {number} names {images / name}, which is missing; restore it")
            files.append(f"images/{name}")
            labels.append(label_of[wnid])
        if not files:
            raise HistError(f"{notes} labels no images")
    return {"signature": signature, "classes": classes, "files": files, "labels": labels}


# ---------------------------------------------------------------- the cache


def _cache_paths(data_dir: Path, kind: str, split: str) -> list[Path]:
    """Next to the data first; under $HIST_CACHE (or ~/.cache/hist) where the data is read-only."""
    name = f".hist-index-{kind}-{split}.json"
    base = os.environ.get("HIST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hist"
    key = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return [data_dir / name, Path(base) / "index" / f"{key}-{kind}-{split}.json"]


def _first_valid(paths: list[Path], data_dir: Path, kind: str, split: str) -> dict | None:
    for path in paths:
        found = _read_cache(path, data_dir, kind, split)
        if found is not None:
            return found
    return None


def _read_cache(path: Path, data_dir: Path, kind: str, split: str) -> dict | None:
    """A cached index if it is whole and every folder it was built from is unchanged, else None."""
    try:
        with open(path) as f:
            found = json.load(f)
        if (found["format"], found["kind"], found["split"]) != (CACHE_FORMAT, kind, split):
            return None
        signature, classes, files, labels = found["signature"], found["classes"], found["files"], found["labels"]
        if not (isinstance(signature, dict) and signature and isinstance(files, list) and len(files) == len(labels)):
            return None
        if not all(isinstance(c, str) for c in classes) or not all(isinstance(f, str) for f in files):
            return None
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(label_array) and (label_array.min() < 0 or label_array.max() >= len(classes)):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, damaged or from another version: rebuilt
    for rel, stamp in signature.items():
        if _stamp(data_dir / rel) != stamp:
            return None
    found["labels"] = label_array
    return found


def _write_cache(paths: list[Path], index: dict) -> None:
    """Atomically (temporary file, then rename), at the first place that takes it; a cache
    that cannot be written anywhere only costs a listing at the next start."""
    blob = json.dumps(index, separators=(",", ":"))
    for path in filter(_may_write, paths):
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(blob)
            os.replace(tmp, path)
            return
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass


def _may_write(path: Path) -> bool:
    """Whether to write beside `path`: its folder is writable and not marked read-only by its
    mode bits (which root would otherwise ignore, writing into a shared read-only data set)."""
    try:
        mode = os.stat(path.parent).st_mode
    except OSError:
        return True  # not there yet: creating it decides
    return bool(mode & 0o222) and os.access(path.parent, os.W_OK)


@contextmanager
def _lock(paths: list[Path]):
    """While one rank lists the folders, the others on the same file system wait for its
    cache instead of listing too. Best effort: no lock where none can be taken."""
    handle = None
    for path in filter(_may_write, paths):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path.with_name(path.name.removesuffix(".json") + ".lock"), "a")
            fcntl.flock(handle, fcntl.LOCK_EX)
            break
        except OSError:
            if handle is not None:
                handle.close()
                handle = None
    try:
        yield
    finally:
        if handle is not None:
            handle.close()
