"""The run configuration: every key with its meaning. Written into every timing file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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


@dataclass
class Config:
    dataset: str = "synthetic"  # cifar10 | cifar100 | svhn | synthetic | imagefolder | imagenet | imagenette | imagewoof | tiny-imagenet
    data_dir: str | None = (
        None  # official files, or the image folder with train/ and val/ (default: $HIST_DATA or ~/.cache/hist/data)
    )
    synthetic_size: int = 4096  # training images of the synthetic dataset
    synthetic_test_size: int = 0  # test images of the synthetic dataset (0 = a quarter of synthetic_size, at least 256)
    arch: str = "preact_resnet101"  # hist.models.ARCHS: preact_resnet* (32x32 stem), imagenet_preact_resnet* (7x7 stem, bottlenecks)
    width: float = 1.0  # channel multiplier (1.0 = 64/128/256/512); small values for CPU runs
    method: str = "ist"  # ist | local-sgd | dp (one process: the full model, whatever the method)
    subnets: int = 0  # IST subnetworks S; 0 = one per process; processes must be a multiple of S
    min_depth: int = 0  # least partitioned blocks per subnetwork (extra blocks are shared and averaged)
    balance: str = "none"  # ist: none (even block counts) | speed (counts follow each subnetwork's measured step speed, so a slower worker gets fewer blocks)
    aggregate: str = "copy"  # copy (the owner's values) | average (mean over subnetworks that trained it)
    shared_precision: str = "fp32"  # fp32 | fp16 | int8 | int4: how ist's shared parameters (local-sgd: the whole model) and their momentum are averaged: fp32 weights or the round's fp16 change by allreduce; int8/int4 change packed with per-chunk scales and error feedback (hist.comm.quantized)
    shared_topk: float = 0.0  # ist/local-sgd: send only this fraction of the round's change (the largest of each chunk of 256, with error feedback; 0 = all)
    block_precision: str = "fp32"  # ist: fp32 | fp16 | int8: blocks delivered as their change since the last full synchronisation, which every rank holds (sender and receivers keep the decoded bits)
    optimizer_state: str = "average"  # ist/local-sgd: average (momentum aggregated with the weights) | restart (zeroed every round, as the reference)
    outer_lr: float = (
        1.0  # ist/local-sgd: outer step on the round's aggregated change (DiLoCo: 0.7; 1 = plain aggregation)
    )
    outer_momentum: float = 0.0  # ist/local-sgd: Nesterov momentum of the outer step (DiLoCo: 0.9; 0 = none)
    warmup_local_sgd_epochs: float = 0.0  # ist: local SGD on the full model for this many epochs before IST starts
    local_iters: int = 50  # local steps between aggregations (one round); logging granularity for dp
    round_schedule: str = "constant"  # constant: rounds of local_iters | post-local: 1-step rounds until the lr's first drop (half the run), then local_iters | qsr: max(local_iters, (qsr_alpha / lr)^2)
    qsr_alpha: float = (
        0.1  # qsr: round length floor((alpha / lr)^2) once it exceeds local_iters (at lr 0.01: 100 steps)
    )
    data_split: str = "shard"  # shard: each epoch cut into disjoint per-rank shards (N ranks take 1/N of the steps) | full: every rank passes the whole set each epoch in its own order (the ResIST release)
    epochs: float = (
        1.0  # epochs of one rank's data (--data-split): the schedule, warm-up and every *-epochs option count these
    )
    batch_size: int = 128  # per process
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 on all parameters
    schedule: str = "step"  # step (/10 at 50% and 75%) | cosine
    warmup_epochs: float = 0.5  # linear warm-up from lr/10 over this many epochs (every method, one process too)
    lr_scaling: str = "auto"  # auto: linear under --data-split shard, none under full | linear: peak lr x processes (Goyal et al.), every method | none
    bn_batches: int = 8  # training batches that recalibrate BatchNorm statistics before evaluation
    eval_bn: str = "recalibrate"  # recalibrate: BatchNorm statistics recomputed for the full model on bn_batches training batches | batch: each test batch's own statistics (the ResIST release)
    test_scale: str = "auto"  # auto: IST's partitioned branches scaled by each block's probability of being trained (1/S without overlap) | none: unscaled
    eval_every: int = 0  # rounds between evaluations (0 = only at the end)
    eval_every_epochs: float = 0.0  # also evaluate at the first round end after every this many epochs (0 = off)
    eval_batch_size: int = 256  # evaluation batch
    noise_every: int = (
        0  # rounds between gradient-noise-scale probes (0 = none): two half-batch gradients a rank, one allreduce
    )
    crop: int = 224  # image folders: training crop (random-resized) and evaluation crop, in pixels
    eval_resize: int = 256  # image folders: evaluation images resized to this shorter side, then centre-cropped
    workers: int = 4  # image folders: decoding processes per rank (0 = decode in the training process)
    checkpoint_every: int = 0  # rounds between checkpoints (0 = only on a signal)
    checkpoint: str | None = None  # checkpoint path (default: the --out file with .ckpt.pt)
    stop_signal: str = (
        "USR2"  # USR1 | USR2 | TERM: the time-limit warning (SIGTERM always stops too); USR2 is safe beside NCCL
    )
    stop_after_rounds: int = (
        0  # stop as on --stop-signal (checkpoint, exit 3) after this many rounds of this process (0 = never)
    )
    resume: bool = False  # continue from the checkpoint if it exists
    seed: int = 0  # seeds the model, the plans, the data order and augmentation
    precision: str = (
        "fp32"  # fp32 | bf16 | fp16: autocast of the forward pass; fp16 adds a gradient scaler (weights stay fp32)
    )
    channels_last: bool | None = (
        None  # NHWC memory layout for the model and batches; None: where measured faster (engine.precision.prefers_channels_last)
    )
    block_transport: str = (
        "auto"  # auto | host | device: IST blocks over MPI via pinned host buffers or device memory (CUDA-aware MPI)
    )
    backend: str = (
        "auto"  # auto | horovod | torch: the multi-process engine (auto: the launcher's; hist.world.resolve_engine)
    )
    overlap: bool = True  # IST: block transfers run while the shared-parameter allreduce is in flight
    device: str = "auto"  # auto (the local rank's GPU if CUDA works, else CPU) | cpu | cuda
    share_gpus: bool = False  # allow more ranks than GPUs on a node (tests, a 1-GPU box); refused otherwise
    threads: int = 0  # torch intra-op threads per process (0 = torch's default)
    log_every: float = 30.0  # rank 0: a progress line at most every this many seconds (a bar on a terminal); 0 = none
    tensorboard: str | None = None  # rank 0 writes TensorBoard scalars here (the timing file stays the record)
    out: str | None = None  # timing file (default: runs/<method>-<dataset>-np<N>[-<jobid>].h5)
    plan_check_every: int = 10  # rounds between cross-rank checks of the plan digest

    def validate(self) -> None:
        """Numbers that cannot work give one clear error before any process starts computing."""
        checks = [
            _one_of("--method", self.method, METHODS),
            _one_of("--aggregate", self.aggregate, AGGREGATES),
            _one_of("--schedule", self.schedule, SCHEDULES),
            _one_of("--shared-precision", self.shared_precision, SHARED_PRECISIONS),
            _one_of("--block-precision", self.block_precision, BLOCK_PRECISIONS),
            _one_of("--optimizer-state", self.optimizer_state, OPTIMIZER_STATES),
            _one_of("--lr-scaling", self.lr_scaling, LR_SCALINGS),
            _one_of("--stop-signal", self.stop_signal, STOP_SIGNALS),
            _one_of("--device", self.device, DEVICES),
            _one_of("--precision", self.precision, PRECISIONS),
            _one_of("--block-transport", self.block_transport, BLOCK_TRANSPORTS),
            _one_of("--backend", self.backend, BACKENDS),
            _one_of("--data-split", self.data_split, DATA_SPLITS),
            _one_of("--round-schedule", self.round_schedule, ROUND_SCHEDULES),
            _one_of("--balance", self.balance, BALANCES),
            _one_of("--eval-bn", self.eval_bn, EVAL_BNS),
            _one_of("--test-scale", self.test_scale, TEST_SCALES),
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
