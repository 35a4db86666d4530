"""Named presets: the settings of the published comparison, for GPUs and for a small CPU.

A preset gives defaults to `hist-train` (`--preset NAME`); options given on the command line
win. The accuracy suite (`hist-bench accuracy`) and `jobs/sweep.sh` run every method with the
same preset, so a comparison never mixes settings.
"""

from __future__ import annotations

from .errors import HistError

# ResIST's training recipe: SGD 0.1, momentum 0.9, weight decay 5e-4, learning rate /10 at 50%
# and 75%, batch 128 per process, 50 local iterations, ResNet-101.
RECIPE = dict(
    arch="preact_resnet101", batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="step", local_iters=50
)

# name -> (what it is for, Config keys it sets)
PRESETS: dict[str, tuple[str, dict]] = {
    "paper": (
        "ResIST's CIFAR setting for GPUs as its release runs it: ResNet-101 width 1, 160 epochs, batch 128 "
        "per process, every worker on the whole training set each epoch, momentum restarted every round, "
        "no learning-rate scaling or warm-up",
        {
            **RECIPE,
            "width": 1.0,
            "epochs": 160,
            "eval_every_epochs": 10,
            "checkpoint_every": 100,
            "data_split": "full",
            "optimizer_state": "restart",
            "lr_scaling": "none",
            "warmup_epochs": 0.0,
        },
    ),
    "cpu": (
        "the same recipe sized for a 2-core CPU: ResNet-101 width 1/16, 12 epochs, one thread a process "
        "(either protocol: --data-split shard or full)",
        {**RECIPE, "width": 0.0625, "epochs": 12, "eval_every_epochs": 1, "checkpoint_every": 20, "threads": 1},
    ),
    "smoke": (
        "a seconds-long check that the suite runs end to end (CI)",
        {
            "arch": "preact_resnet101",
            "width": 0.0625,
            "epochs": 0.25,
            "batch_size": 32,
            "lr": 0.05,
            "local_iters": 4,
            "eval_every_epochs": 0.1,
            "bn_batches": 2,
            "threads": 1,
            "synthetic_size": 1024,
        },
    ),
}


def preset_options(name: str) -> dict:
    """The Config keys a preset sets; a ValueError names the choices."""
    if name not in PRESETS:
        raise HistError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name][1])
