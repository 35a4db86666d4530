"""Methods: what a round trains and how it is synchronised (`base` has the hooks)."""

from __future__ import annotations

from ..choices import METHODS
from ..comm import Synchroniser
from ..config import Config
from ..models import PreActResNet
from .base import Averaging, Method, momentum_buffers
from .dp import DataParallel
from .ist import IST
from .local_sgd import LocalSGD
from .sgd import SGD, skip_dynamo_wrappers

METHOD_CLASSES = {"ist": IST, "local-sgd": LocalSGD, "dp": DataParallel}
assert tuple(METHOD_CLASSES) == METHODS


def build_method(cfg: Config, model: PreActResNet, sync: Synchroniser, peak_lr: float, warm_rounds: int = 0) -> Method:
    """The method of this run with its optimizer: one process always trains the full model.
    `warm_rounds`: rounds of local SGD before IST starts (--warmup-local-sgd-epochs)."""
    optimizer = SGD(model.parameters(), lr=peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = METHOD_CLASSES[cfg.method] if sync.size > 1 else Method
    return cls(model, sync, cfg, optimizer, warm_rounds)


__all__ = [
    "Averaging",
    "DataParallel",
    "IST",
    "LocalSGD",
    "METHOD_CLASSES",
    "Method",
    "build_method",
    "momentum_buffers",
    "skip_dynamo_wrappers",
]
