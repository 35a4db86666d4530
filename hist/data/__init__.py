"""Data: sources and their readers, the file store (download and cache), the on-device loader."""

from ..choices import DATASETS
from .loader import DeviceLoader, augment_batch
from .sources import (
    NUM_CLASSES,
    SOURCES,
    STATS,
    Source,
    Split,
    read_cifar10,
    read_cifar100,
    read_svhn,
    synthetic,
)
from .store import download, load, locate

__all__ = [
    "DATASETS",
    "DeviceLoader",
    "NUM_CLASSES",
    "SOURCES",
    "STATS",
    "Source",
    "Split",
    "augment_batch",
    "download",
    "load",
    "locate",
    "read_cifar10",
    "read_cifar100",
    "read_svhn",
    "synthetic",
]
