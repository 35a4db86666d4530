"""Methods: what a round trains and how it is synchronised (`base` has the hooks)."""

from __future__ import annotations

from ..choices import METHODS
from ..config import Config
from ..models import PreActResNet
from .base import Averaging, Method, momentum_buffers
from .dp import DataParallel
from .ist import IST
from .local_sgd import LocalSGD
from .sgd import SGD, skip_dynamo_wrappers

METHOD_CLASSES = {"ist": IST, "local-sgd": LocalSGD, "dp": DataParallel}
assert tuple(METHOD_CLASSES) == METHODS


def build_optimizer(cfg: Config, model: PreActResNet, peak_lr: float) -> SGD:
    """hist-train's optimizer: SGD with the run's momentum and weight decay, at the peak rate."""
    return SGD(model.parameters(), lr=peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


__all__ = [
    "Averaging",
    "DataParallel",
    "IST",
    "LocalSGD",
    "METHOD_CLASSES",
    "Method",
    "build_optimizer",
    "momentum_buffers",
    "skip_dynamo_wrappers",
]
