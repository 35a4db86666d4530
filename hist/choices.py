"""Every named choice of hist, in one place: the options, their validation and the analysis
all read these tuples. (Architectures live with the networks in `hist.models`, presets in
`hist.presets`.) Nothing here imports anything, so the command lines stay quick to start."""

# 32x32 sets read whole onto the device (hist.data.loader)
ARRAY_DATASETS = ("cifar10", "cifar100", "svhn", "synthetic")
# image-folder sets streamed from disk (hist.data.folders, hist.data.streaming)
FOLDER_DATASETS = ("imagefolder", "imagenet", "imagenette", "imagewoof", "tiny-imagenet")
DATASETS = ARRAY_DATASETS + FOLDER_DATASETS
METHODS = ("ist", "local-sgd", "dp")
AGGREGATES = ("copy", "average")
SCHEDULES = ("step", "cosine")
OPTIMIZER_STATES = ("average", "restart")
# auto: linear under --data-split shard (N ranks take a round's N x batch between averages),
# none under full (every rank already takes the one-process run's steps at its batch)
LR_SCALINGS = ("auto", "linear", "none")
# what travels when the shared parameters (local SGD: the whole model) are averaged: fp32 and
# fp16 by allreduce, int8 and int4 packed with error feedback (hist.comm.quantized)
SHARED_PRECISIONS = ("fp32", "fp16", "int8", "int4")
# IST blocks delivered to their next subnetwork: fp32, or fp16/int8 against the last full sync
BLOCK_PRECISIONS = ("fp32", "fp16", "int8")
PRECISIONS = ("fp32", "bf16", "fp16")
BLOCK_TRANSPORTS = ("auto", "host", "device")
DEVICES = ("auto", "cpu", "cuda")
# the engine of a multi-process run (hist.world.resolve_engine): auto follows the launcher;
# horovod is Horovod + MPI (horovodrun, mpirun, srun --mpi=pmix), torch is torch.distributed
# (torchrun, or srun without an MPI plugin): Gloo on CPUs, NCCL on GPUs
BACKENDS = ("auto", "horovod", "torch")
STOP_SIGNALS = ("USR2", "USR1", "TERM")
# shard: each epoch one permutation cut into disjoint per-rank shards (N ranks take 1/N of the
# steps); full: every rank passes the whole set each epoch in its own order (the ResIST release)
DATA_SPLITS = ("shard", "full")
# round lengths over the run (hist.engine.rounds): fixed, post-local SGD, the quadratic rule
ROUND_SCHEDULES = ("constant", "post-local", "qsr")
# ist: even block counts, or counts that follow each subnetwork's measured speed (hist.models.balance)
BALANCES = ("none", "speed")
# evaluation: BatchNorm statistics recomputed for the full model on training batches, or each
# test batch's own (the ResIST release evaluates in training mode)
EVAL_BNS = ("recalibrate", "batch")
# evaluation: IST's partitioned branches scaled by each block's training probability, or not at all
TEST_SCALES = ("auto", "none")

# A one-process run trains the full model whatever method was asked for; it is labelled so.
SINGLE = "single"


def run_label(method: str, world_size: int) -> str:
    """The method a run is reported under: `single` for one process."""
    return method if world_size > 1 else SINGLE
