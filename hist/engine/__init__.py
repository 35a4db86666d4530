"""The engine: the round loop, one step, evaluation, the learning-rate schedule, stop signals."""

from ..models import recalibrate_batchnorm
from .evaluation import evaluate
from .loop import Result, RoundStats, train
from .schedule import lr_at, lr_scaling, peak_lr
from .signals import STOP_SIGNALS, StopFlag

__all__ = [
    "Result",
    "RoundStats",
    "STOP_SIGNALS",
    "StopFlag",
    "evaluate",
    "lr_at",
    "lr_scaling",
    "peak_lr",
    "recalibrate_batchnorm",
    "train",
]
