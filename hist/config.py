"""The run configuration: every key with its meaning. Written into every timing file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .choices import (
    AGGREGATES,
    BACKENDS,
    BALANCES,
    BLOCK_PRECISIONS,
    BLOCK_TRANSPORTS,
    DATA_SPLITS,
    DEVICES,
    EVAL_BNS,
    FOLDER_DATASETS,
    LR_SCALINGS,
    METHODS,
    OPTIMIZER_STATES,
    PRECISIONS,
    ROUND_SCHEDULES,
    SCHEDULES,
    SHARED_PRECISIONS,
    STOP_SIGNALS,
    TEST_SCALES,
)
from .errors import HistError

# The architecture a dataset gets when --arch is not given: the 32x32 stem for the small sets,
# the ImageNet stem (7x7, stride 2, max-pool) and bottlenecks for image folders.
DEFAULT_ARCH = {"array": "preact_resnet101", "folder": "imagenet_preact_resnet101"}


def default_arch(dataset: str) -> str:
    return DEFAULT_ARCH["folder" if dataset in FOLDER_DATASETS else "array"]


def _one_of(flag: str, value, choices) -> tuple[bool, str]:
    return value in choices, f"{flag} {value!r}: choose one of {', '.join(choices)}"


def option(
    default,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    identity: bool = False,
    bookkeeping: bool = False,
    path: bool = False,
    cli: bool = True,
):
    """One option, declared once: its default and help, its choices (checked by `validate`, offered
    by the CLI), whether a checkpoint must match it to resume (`identity`), whether it only says
    where files go or how a run is watched (`bookkeeping`: hist-report does not tell runs apart
    by it), whether its value is a path, and whether hist-train offers it."""
    meta = dict(help=help, choices=choices, identity=identity, bookkeeping=bookkeeping, path=path, cli=cli)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # fmt: off
    dataset: str = option("synthetic", "cifar10 | cifar100 | svhn | synthetic | imagefolder | imagenet | imagenette | imagewoof | tiny-imagenet (hist-train's argument).", identity=True, cli=False)
    data_dir: str | None = option(None, "Folder of the official files, or the image folder with train/ and val/ [default: $HIST_DATA or ~/.cache/hist/data].", bookkeeping=True, path=True)
    synthetic_size: int = option(4096, "Training images of the synthetic dataset.", identity=True)
    synthetic_test_size: int = option(0, "Test images of the synthetic dataset (0 = a quarter of --synthetic-size, at least 256).")
    arch: str = option("preact_resnet101", "hist.models.ARCHS: preact_resnet* (32x32 stem), imagenet_preact_resnet* (7x7 stem, bottlenecks) [default: preact_resnet101 for 32x32 sets, imagenet_preact_resnet101 for image folders].", identity=True)
    width: float = option(1.0, "Channel multiplier (1.0 = 64/128/256/512; small for CPU runs).", identity=True)
    method: str = option("ist", "ist | local-sgd | dp (one process: the full model, whatever the method).", choices=METHODS, identity=True)
    subnets: int = option(0, "IST subnetworks S (0 = one per process; processes must be a multiple of S).", identity=True)
    min_depth: int = option(0, "Least partitioned blocks per subnetwork (extra blocks are shared and averaged).", identity=True)
    balance: str = option("none", "ist: none (even block counts) or speed (a slower subnetwork gets fewer blocks, so every rank ends its round together).", choices=BALANCES, identity=True)
    aggregate: str = option("copy", "copy (the owner's values) | average (mean over the subnetworks that trained a block).", choices=AGGREGATES, identity=True)
    shared_precision: str = option("fp32", "ist/local-sgd: what the round's average of the shared parameters (local-sgd: the whole model) and their momentum sends: fp32 weights, the fp16 change, or the change packed in int8/int4 with error feedback (hist.comm.quantized).", choices=SHARED_PRECISIONS, identity=True)
    shared_topk: float = option(0.0, "ist/local-sgd: send only this fraction of the round's change, the largest of each chunk of 256, with error feedback (0 = all).", identity=True)
    block_precision: str = option("fp32", "ist: deliver blocks as their change since the last full synchronisation in fp16 or int8 (sender and receivers keep the decoded bits).", choices=BLOCK_PRECISIONS, identity=True)
    optimizer_state: str = option("average", "ist/local-sgd: average (momentum aggregated with the weights) | restart (zeroed every round, as the reference).", choices=OPTIMIZER_STATES, identity=True)
    outer_lr: float = option(1.0, "ist/local-sgd: outer step on the round's aggregated change (DiLoCo: 0.7; 1 = plain aggregation).", identity=True)
    outer_momentum: float = option(0.0, "ist/local-sgd: Nesterov momentum of the outer step (DiLoCo: 0.9; 0 = none).", identity=True)
    warmup_local_sgd_epochs: float = option(0.0, "ist: local SGD on the full model for this many epochs before IST starts.", identity=True)
    local_iters: int = option(50, "Local steps per round (dp: the logging granularity).", identity=True)
    round_schedule: str = option("constant", "Round lengths: constant (--local-iters), post-local (every step until the lr's first drop, at half the run), qsr (max(--local-iters, (alpha/lr)^2)).", choices=ROUND_SCHEDULES, identity=True)
    qsr_alpha: float = option(0.1, "qsr: alpha of the round length floor((alpha / lr)^2) (at lr 0.01 and 0.1: 100 steps).", identity=True)
    data_split: str = option("shard", "shard: each epoch cut into per-rank shards (N ranks take 1/N of the steps); full: every rank passes the whole set each epoch in its own order (the ResIST release).", choices=DATA_SPLITS, identity=True)
    epochs: float = option(1.0, "Epochs of one rank's data (see --data-split): the schedule, warm-up and every *-epochs option count these.")
    batch_size: int = option(128, "Batch per process.", identity=True)
    lr: float = option(0.1, "Peak learning rate.")
    momentum: float = option(0.9, "SGD momentum.")
    weight_decay: float = option(5e-4, "L2 on all parameters.")
    schedule: str = option("step", "step (/10 at 50% and 75%) | cosine.", choices=SCHEDULES)
    warmup_epochs: float = option(0.5, "Linear warm-up from lr/10 over this many epochs (every method, one process too).")
    lr_scaling: str = option("auto", "auto: linear under --data-split shard, none under full | linear: peak lr x processes (Goyal et al.; pair with --warmup-epochs) | none.", choices=LR_SCALINGS)
    bn_batches: int = option(8, "Training batches that recalibrate BatchNorm statistics before evaluation.")
    eval_bn: str = option("recalibrate", "recalibrate: BatchNorm statistics recomputed for the full model on --bn-batches training batches; batch: each test batch's own (the ResIST release).", choices=EVAL_BNS)
    test_scale: str = option("auto", "IST at evaluation: auto scales each block by its probability of being trained (1/S without overlap); none: unscaled.", choices=TEST_SCALES)
    eval_every: int = option(0, "Rounds between evaluations (0 = at the end).")
    eval_every_epochs: float = option(0.0, "Also evaluate at the first round end after every this many epochs (the same points in data for every process count; 0 = off).")
    eval_batch_size: int = option(256, "Evaluation batch.")
    noise_every: int = option(0, "Rounds between gradient-noise-scale probes (0 = none; two half-batch gradients a rank, one allreduce); hist-report says how many GPUs pay.")
    crop: int = option(224, "Image folders: training crop (random-resized) and evaluation crop, in pixels.")
    eval_resize: int = option(256, "Image folders: evaluation images resized to this shorter side, then centre-cropped.")
    workers: int = option(4, "Image folders: decoding processes per rank (0 = decode in the training process).")
    checkpoint_every: int = option(0, "Rounds between checkpoints (0 = on a signal and at the end).", bookkeeping=True)
    checkpoint: str | None = option(None, "Checkpoint path [default: beside --out, .ckpt.pt].", bookkeeping=True, path=True)
    stop_signal: str = option("USR2", "Signal that checkpoints and stops at the next round end (match #SBATCH --signal; USR2 is safe beside NCCL); SIGTERM always does.", choices=STOP_SIGNALS, bookkeeping=True)
    stop_after_rounds: int = option(0, "Checkpoint and stop (exit 3), as on the signal, after this many rounds of this process (0 = never).", bookkeeping=True)
    resume: bool = option(False, "Continue from the checkpoint if there is one.", bookkeeping=True)
    seed: int = option(0, "Seeds the model, the plans, the data order and augmentation.", identity=True, bookkeeping=True)
    precision: str = option("fp32", "Autocast of the forward pass; fp16 adds a gradient scaler agreed within each subnetwork (weights stay fp32).", choices=PRECISIONS)
    channels_last: bool | None = option(None, "NHWC memory layout for the model and the batches [default: where measured faster: on a CPU; off on a GPU (engine.precision.prefers_channels_last)].")
    block_transport: str = option("auto", "IST blocks over MPI: host (pinned buffers), device (CUDA-aware MPI), auto (device where possible).", choices=BLOCK_TRANSPORTS)
    backend: str = option("auto", "Multi-process engine: horovod (Horovod + MPI: horovodrun, mpirun, srun --mpi=pmix), torch (torch.distributed: torchrun, srun), auto (the launcher's; hist.world.resolve_engine).", choices=BACKENDS)
    overlap: bool = option(True, "IST: move blocks while the shared-parameter allreduce is in flight.")
    device: str = option("auto", "auto (the local rank's GPU if CUDA works, else CPU) | cpu | cuda.", choices=DEVICES)
    share_gpus: bool = option(False, "Allow several ranks on one GPU (tests, a 1-GPU box; otherwise refused: one rank per GPU).")
    threads: int = option(0, "Torch intra-op threads per process (0 = torch's default).")
    log_every: float = option(30.0, "Seconds between progress lines of rank 0 (a bar on a terminal); 0 = none.", bookkeeping=True)
    tensorboard: str | None = option(None, "Folder for TensorBoard scalars (rank 0); the timing file stays the record.", bookkeeping=True, path=True)
    out: str | None = option(None, "Timing file [default: runs/<method>-<dataset>-np<N>[-<jobid>].h5].", bookkeeping=True, path=True)
    plan_check_every: int = option(10, "Rounds between cross-rank checks of the plan digest.", cli=False)
    # fmt: on

    def validate(self) -> None:
        """Numbers that cannot work give one clear error before any process starts computing."""
        checks = [
            _one_of(flag(f.name), getattr(self, f.name), f.metadata["choices"])
            for f in dataclasses.fields(self)
            if f.metadata["choices"]
        ]
        checks += [
            (
                self.balance == "none" or self.method == "ist",
                f"--balance {self.balance} moves IST's blocks; --method {self.method} trains the full model "
                f"on every rank: use --method ist or leave --balance at none",
            ),
            (
                0 <= self.shared_topk < 1,
                f"--shared-topk {self.shared_topk} must be a fraction in [0, 1) (0 sends every value)",
            ),
            (
                self.method != "dp" or (self.shared_precision, self.shared_topk) == ("fp32", 0),
                "--shared-precision and --shared-topk shape ist's and local-sgd's round averages; --method dp "
                "averages gradients every step: use --method ist or local-sgd, or leave them at fp32 and 0",
            ),
            (
                self.block_precision == "fp32" or (self.method == "ist" and self.aggregate == "copy"),
                f"--block-precision {self.block_precision} delivers IST blocks from their one owner: it needs "
                f"--method ist and --aggregate copy (this run: --method {self.method} --aggregate {self.aggregate})",
            ),
            (self.qsr_alpha > 0, f"--qsr-alpha {self.qsr_alpha} must be positive"),
            (self.lr > 0, f"--lr {self.lr} must be positive"),
            (self.outer_lr > 0, f"--outer-lr {self.outer_lr} must be positive"),
            (0 <= self.outer_momentum < 1, f"--outer-momentum {self.outer_momentum} must be in [0, 1)"),
            (
                self.warmup_local_sgd_epochs >= 0 and self.warmup_epochs >= 0,
                "--warmup-epochs and --warmup-local-sgd-epochs must not be negative",
            ),
            (self.batch_size > 0, f"--batch-size {self.batch_size} must be at least 1"),
            (
                0 < self.crop <= self.eval_resize,
                f"--crop {self.crop} must be positive and at most --eval-resize {self.eval_resize}",
            ),
            (self.workers >= 0, f"--workers {self.workers} must not be negative"),
            (self.stop_after_rounds >= 0, f"--stop-after-rounds {self.stop_after_rounds} must not be negative"),
            (self.log_every >= 0, f"--log-every {self.log_every} must not be negative (0 turns progress lines off)"),
            (self.local_iters > 0, f"--local-iters {self.local_iters} must be at least 1"),
            (self.epochs > 0, f"--epochs {self.epochs} must be positive"),
            (self.width > 0, f"--width {self.width} must be positive"),
            (self.subnets >= 0, f"--subnets {self.subnets} must be at least 1 (0 = one per process)"),
            (self.min_depth >= 0, f"--min-depth {self.min_depth} must not be negative"),
            (self.momentum >= 0 and self.weight_decay >= 0, "--momentum and --weight-decay must not be negative"),
            (
                min(self.eval_every, self.checkpoint_every, self.eval_every_epochs, self.noise_every) >= 0,
                "--eval-every, --eval-every-epochs, --checkpoint-every and --noise-every must not be negative",
            ),
            (
                self.synthetic_size > 0 and self.eval_batch_size > 0 and self.bn_batches >= 0,
                "--synthetic-size, --eval-batch-size must be positive and --bn-batches not negative",
            ),
            (
                self.synthetic_test_size >= 0,
                f"--synthetic-test-size {self.synthetic_test_size} must not be negative (0 = a quarter of --synthetic-size)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise HistError(message)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    """The command-line flag of option `name`."""
    return "--" + name.replace("_", "-")


def identity_keys() -> tuple[str, ...]:
    """The options a checkpoint must match for a run to resume from it."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["identity"])


def bookkeeping_keys() -> frozenset[str]:
    """The options that say where a run's files live or how it is watched, not what it trained."""
    return frozenset(f.name for f in dataclasses.fields(Config) if f.metadata["bookkeeping"])
