"""Data: sources and their readers, the file store (download and cache), image-folder indexes,
the on-device loader and the streaming loader.

The loaders (which need torch) are imported on first use: the streaming loader's decoding
workers import `hist.data.decode`, hence this package, and must start without torch."""

from ..choices import DATASETS
from .folders import FOLDER_DATASETS, FOLDER_NUM_CLASSES, FOLDER_STATS, FolderSplit, index_folder
from .meter import Meter
from .sources import (
    NUM_CLASSES,
    SOURCES,
    STATS,
    UNAUGMENTED,
    Source,
    Split,
    num_classes,
    read_cifar10,
    read_cifar100,
    read_svhn,
    synthetic,
)
from .store import download, load, locate


def __getattr__(name: str):
    """The loaders, imported when first asked for (they bring torch)."""
    if name in ("DeviceLoader", "augment_batch"):
        from . import loader

        return getattr(loader, name)
    if name == "StreamingLoader":
        from .streaming import StreamingLoader

        return StreamingLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "DeviceLoader",
    "FOLDER_DATASETS",
    "FOLDER_NUM_CLASSES",
    "FOLDER_STATS",
    "FolderSplit",
    "Meter",
    "NUM_CLASSES",
    "SOURCES",
    "STATS",
    "UNAUGMENTED",
    "Source",
    "Split",
    "StreamingLoader",
    "augment_batch",
    "download",
    "index_folder",
    "load",
    "locate",
    "num_classes",
    "read_cifar10",
    "read_cifar100",
    "read_svhn",
    "synthetic",
]
