"""The composition root: one launch function for a laptop, `horovodrun`, `mpirun`, `torchrun` or `srun`.

It wires the floors together (data, model, method, communication, files) and hands them to
the round loop. Everything that can be checked identically on every rank (options, data
files, the output folder) is checked before MPI starts, so bad input ends every rank with the
same clear line; what needs the ranks to agree (a clashing run, a bad checkpoint, a failed
first write) is agreed on and said once, by rank 0.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import data as datasets
from .choices import FOLDER_DATASETS, run_label
from .comm import Sync, connect
from .comm.traffic import traffic_precisions
from .config import Config, identity_keys
from .data.order import images_per_rank
from .engine import Result, StopFlag, lr_scaling, peak_lr, train
from .engine.precision import check_supported, prefers_channels_last
from .engine.progress import Progress
from .engine.rounds import round_starts, rounds_before
from .errors import CollectiveError, HistError
from .io import checkpoint as ckpt
from .io.fanout import Fanout
from .io.runlock import RunLock
from .io.timings import TimingWriter
from .methods import build_optimizer, skip_dynamo_wrappers
from .models import ARCHS, build_model, partitioned_block_count
from .models.plan import validate as validate_plan
from .world import cpu_description, resolve_engine, under_launcher, world_info_from_env


def resolve_device(choice: str, local_rank: int) -> torch.device:
    """The local rank's device, not yet made current: where several ranks run, the
    Synchroniser picks each rank's own GPU once the ranks can compare what they see
    (`world.gpu_slot`) and makes it current before Horovod starts; one process makes it current
    after `connect` (so CUDA events and streams live on it, not on GPU 0)."""
    if choice == "cpu":
        return torch.device("cpu")
    usable = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if usable:
        # Two ranks given one GPU here (more local ranks than visible GPUs) are found once
        # the ranks can compare placements: check_gpu_placement, after MPI starts.
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if choice == "cuda":
        raise HistError("--device cuda but no usable CUDA device; use --device cpu or auto")
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        warnings.warn(
            f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} but CUDA is not "
            f"usable here; training on the CPU"
        )
    return torch.device("cpu")


def gpu_identity(device: torch.device) -> str | None:
    """What names this rank's GPU on its host across CUDA_VISIBLE_DEVICES views (its UUID)."""
    if device.type != "cuda":
        return None
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return str(uuid) if uuid is not None else f"index {device.index}"


def check_gpu_placement(placements: list[tuple[str, str | None]], share: bool, nccl: bool = False) -> None:
    """`placements[r]` = (host, GPU) of rank r. Two ranks on one GPU are refused unless sharing
    is asked for (two ranks on one GPU halve each other's speed), and always where Horovod
    reduces GPU tensors with NCCL (`nccl`): NCCL refuses the duplicate device at the first
    collective ("Duplicate GPU detected", horovod#3929), --share-gpus or not."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for rank, (host, gpu) in enumerate(placements):
        if gpu is not None:
            ranks.setdefault((host, gpu), []).append(rank)
    crowded = {k: v for k, v in ranks.items() if len(v) > 1}
    if crowded and (nccl or not share):
        (host, _), shared = next(iter(crowded.items()))
        here = [v for (h, _), v in ranks.items() if h == host]
        where = f"ranks {', '.join(map(str, shared))} share one GPU on {host}: {sum(map(len, here))} ranks there"
        advice = "launch at most one rank per GPU (srun --gpus-per-task=1 or --ntasks-per-node=<GPUs>)"
        if nccl:
            raise HistError(
                f"{where} on {len(here)} GPU(s), and NCCL (this Horovod's GPU reduction) refuses two ranks "
                f"on one GPU, --share-gpus or not (horovod#3929); {advice}"
            )
        raise HistError(f"{where} on {len(here)} GPU(s); {advice}, or pass --share-gpus if sharing is intended")


def default_out(cfg: Config, world_size: int) -> Path:
    job = os.environ.get("SLURM_JOB_ID")
    return (
        Path("runs") / f"{run_label(cfg.method, world_size)}-{cfg.dataset}-np{world_size}{'-' + job if job else ''}.h5"
    )


def check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HistError(f"cannot create the folder of --out {path}: {e.strerror}; choose a writable place")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HistError(f"cannot write --out {path}: permission denied; choose a writable place")


def versions(sync: Sync, device: torch.device) -> dict:
    import h5py
    import numpy

    from . import __version__

    info = {
        "hist": __version__,
        "torch": torch.__version__,
        **sync.library_versions(),
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "python": sys.version.split()[0],
        "cuda": torch.version.cuda or "none",
        "device": str(device),
        **cpu_description(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@dataclass
class Checked:
    """What the options resolve to, checked before any process talks to another."""

    subnets: int
    out: Path
    checkpoint: Path
    device: torch.device
    engine: str  # "local", "horovod" or "torch" (hist.world.resolve_engine)


def check_options(cfg: Config, world_size: int, local_rank: int) -> Checked:
    """Phase 1, on every rank alike, before MPI: options that cannot work give one line."""
    cfg.validate()
    if cfg.dataset not in datasets.DATASETS:
        raise HistError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(datasets.DATASETS)}")
    if cfg.arch not in ARCHS:
        raise HistError(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    subnets = (cfg.subnets or world_size) if cfg.method == "ist" else 1
    try:
        validate_plan(partitioned_block_count(cfg.arch), subnets, cfg.min_depth)
    except ValueError as e:
        raise HistError(
            f"--subnets {subnets} with --min-depth {cfg.min_depth} on {cfg.arch}: {e}; use fewer "
            f"subnetworks, a smaller --min-depth or a deeper --arch"
        )
    if world_size % subnets:
        raise HistError(
            f"{world_size} processes cannot form {subnets} equal subnetworks; launch a multiple of --subnets processes"
        )
    out = Path(cfg.out) if cfg.out else default_out(cfg, world_size)
    check_writable(out)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else out.with_suffix(".ckpt.pt")
    device = resolve_device(cfg.device, local_rank)
    check_supported(cfg.precision, device)
    return Checked(subnets, out, checkpoint, device, resolve_engine(cfg.backend, world_size))


def load_data(cfg: Config, world_size: int):
    """Phase 2, before MPI: the splits (whole 32x32 arrays, or an image folder's cached file
    index), and a batch that fits every rank's shard."""
    if cfg.dataset in FOLDER_DATASETS:
        if not cfg.data_dir:
            raise HistError(f"{cfg.dataset} needs --data-dir DIR, the folder that holds train/ and val/")
        train_split, test_split = (datasets.index_folder(cfg.dataset, cfg.data_dir, s) for s in ("train", "val"))
    else:
        train_split, test_split = datasets.load(
            cfg.dataset,
            Path(cfg.data_dir) if cfg.data_dir else None,
            cfg.seed,
            synthetic_size=cfg.synthetic_size,
            synthetic_test_size=cfg.synthetic_test_size,
        )
    shard = images_per_rank(len(train_split), world_size, cfg.data_split)
    if cfg.batch_size > shard:
        raise HistError(
            f"--batch-size {cfg.batch_size} is larger than the {shard} training images each of the "
            f"{world_size} ranks gets (--data-split {cfg.data_split}); use a batch of at most {shard}"
        )
    return train_split, test_split


def agree(sync: Sync, error: HistError | None, what: str) -> None:
    """Every rank learns whether rank 0 failed; all raise together, rank 0 says why."""
    if sync.any_over_world(error is not None):
        raise CollectiveError(str(error) if error else what)


def claim_outputs(sync: Sync, checked: Checked) -> RunLock | None:
    """Phase 3: rank 0 locks the timing file and checkpoint against a second run."""
    lock, error = None, None
    if sync.rank == 0:
        try:
            lock = RunLock([checked.out, checked.checkpoint])
        except HistError as e:
            error = e
    agree(sync, error, "another run holds the output files")
    return lock


def load_resume_state(cfg: Config, checked: Checked, identity: dict) -> dict | None:
    if not (cfg.resume and checked.checkpoint.is_file()):
        return None
    try:  # every rank reads the same file and fails the same way: say it once
        return ckpt.load(checked.checkpoint, identity)
    except HistError as e:
        raise CollectiveError(str(e)) from None


def open_recorder(cfg, sync, checked, device, train_data, test_data, resume_state, hosts) -> Fanout | None:
    """Phase 4: rank 0 creates (or continues) the timing file, and the TensorBoard view of it."""
    recorder, error = None, None
    if sync.rank == 0:
        meta = {
            "method": run_label(cfg.method, sync.size),
            "dataset": cfg.dataset,
            "arch": cfg.arch,
            "width": cfg.width,
            "world_size": sync.size,
            "subnets": checked.subnets,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "hosts": hosts,
            "versions": versions(sync, device),
            "config": cfg.as_dict(),
            "train_images": len(train_data),
            "test_images": len(test_data),
            "steps_per_epoch": train_data.steps_per_epoch,
            "data_split": cfg.data_split,
            "balance": cfg.balance,
            "lr_scaling": lr_scaling(cfg),
            "peak_lr": peak_lr(cfg, sync.size),
            "block_transport": sync.block_transport,
            "engine": sync.engine,
            "traffic": traffic_of(cfg, sync.size),
        }
        try:
            start = resume_state["round"] if resume_state else 0
            recorder = Fanout(TimingWriter(checked.out, meta, sync.size, start))
            if cfg.tensorboard:
                from .io.tensorboard import TensorBoardWriter  # only when asked for

                recorder.writers.append(TensorBoardWriter(Path(cfg.tensorboard), cfg.as_dict(), cfg.batch_size, start))
        except HistError as e:
            error = e
    agree(sync, error, "rank 0 could not create the timing file")
    return recorder


def build_loaders(cfg: Config, train_split, test_split, device: torch.device, rank: int, world: int):
    """(train, test) loaders: 32x32 sets whole on the device, image folders streamed from disk."""
    if cfg.dataset in FOLDER_DATASETS:
        sizes = dict(crop=cfg.crop, resize=cfg.eval_resize, workers=cfg.workers)
        return (
            datasets.StreamingLoader(
                train_split,
                cfg.dataset,
                cfg.batch_size,
                device,
                cfg.seed,
                rank,
                world,
                data_split=cfg.data_split,
                **sizes,
            ),
            datasets.StreamingLoader(
                test_split, cfg.dataset, cfg.eval_batch_size, device, cfg.seed, augment=False, **sizes
            ),
        )
    return (
        datasets.DeviceLoader(
            train_split,
            cfg.dataset,
            cfg.batch_size,
            device,
            cfg.seed,
            rank,
            world,
            augment=cfg.dataset not in datasets.UNAUGMENTED,
            data_split=cfg.data_split,
        ),
        datasets.DeviceLoader(test_split, cfg.dataset, cfg.eval_batch_size, device, cfg.seed, augment=False),
    )


def run_training(cfg: Config) -> Result:
    skip_dynamo_wrappers()  # nothing here compiles: no rank imports torch._dynamo (1.5-2 s each)
    world = world_info_from_env()
    checked = check_options(cfg, world.size, world.local_rank)
    if cfg.channels_last is None:  # resolved once the device is known, so the files say what ran
        cfg = replace(cfg, channels_last=prefers_channels_last(checked.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    datasets.Meter.enabled = world.rank == 0  # long waits (a folder's first index, a download) on rank 0 only
    train_split, test_split = load_data(cfg, world.size)
    stop = StopFlag(cfg.stop_signal, cfg.stop_after_rounds)
    stop.install()  # before MPI starts, so an early SIGTERM is not lost

    sync = connect(
        checked.subnets, world.size, checked.engine, block_transport=cfg.block_transport, device=checked.device
    )
    if sync.size > 1:  # the rank's own GPU, chosen once the ranks compared what they see
        checked.device = sync.device
    device = checked.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:  # every rank holds the same list, so every rank decides alike
        placements = sync.allgather((world.host, gpu_identity(device)))
        check_gpu_placement(placements, cfg.share_gpus, nccl=device.type == "cuda" and sync.nccl)
    except HistError as e:
        raise CollectiveError(str(e)) from None
    options_digest = hashlib.sha256(json.dumps(cfg.as_dict(), sort_keys=True).encode()).digest()
    sync.check_same(int.from_bytes(options_digest[:7], "little"), "options")
    lock = claim_outputs(sync, checked)
    identity = {
        **{k: getattr(cfg, k) for k in identity_keys()},
        "subnets": checked.subnets,
        "world_size": sync.size,
    }
    resume_state = load_resume_state(cfg, checked, identity)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, datasets.num_classes(cfg.dataset, train_split), cfg.width).to(device)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    train_data, test_data = build_loaders(cfg, train_split, test_split, device, sync.rank, sync.size)
    train_data.memory_format = test_data.memory_format = layout
    peak = peak_lr(cfg, sync.size)
    starts = round_starts(cfg, train_data.steps_per_epoch, peak)
    warm_rounds = rounds_before(starts, cfg.warmup_local_sgd_epochs * train_data.steps_per_epoch)
    optimizer = build_optimizer(cfg, model, peak)
    recorder = open_recorder(
        cfg, sync, checked, device, train_data, test_data, resume_state, sync.allgather(world.host)
    )
    save = functools.partial(ckpt.save, checked.checkpoint) if sync.rank == 0 else None
    # A bar only on a terminal of one's own: under a launcher the output goes to its log.
    bar = sys.stdout.isatty() and not under_launcher()
    progress = Progress(cfg.log_every, len(starts) - 1, cfg.epochs, bar=bar) if sync.rank == 0 else None
    log = progress.write if progress is not None else (lambda *a, **k: None)
    log(
        f"hist-train {cfg.method} on {cfg.dataset}: {sync.size} process(es), {checked.subnets} subnetwork(s), "
        f"{cfg.arch} width {cfg.width}, data split {cfg.data_split}, device {device}, {cfg.precision}"
        f"{', channels_last' if cfg.channels_last else ''}, engine {sync.engine}, timings -> {checked.out}"
    )
    if resume_state is not None:
        log(f"resuming from {checked.checkpoint}")
    try:
        result = train(
            cfg,
            model,
            optimizer,
            sync,
            train_data,
            test_data,
            peak,
            recorder,
            save,
            log,
            stop,
            resume_state,
            identity,
            progress,
            warm_rounds,
        )
    finally:
        for loader in (train_data, test_data):
            getattr(loader, "close", lambda: None)()  # the streaming loader's decoding processes
        if progress is not None:
            progress.close()
    if recorder is not None:
        recorder.finish("interrupted" if result.stopped_early else "completed", result.wall_s)
    if lock is not None:
        lock.release()
    if result.stopped_early:
        # Stopped to be requeued: no rank exits (3) before rank 0's files are whole. Under srun
        # --kill-on-bad-exit the first exit ends the step, and a task on another node may
        # still be writing when it does.
        sync.allgather(None)
    if not result.stopped_early:
        for line in summary(result, checked, cfg.tensorboard, sync.engine, traffic_of(cfg, sync.size)):
            log(line)
    sync.close()
    return result


def traffic_of(cfg: Config, world_size: int) -> dict[str, str]:
    """What each kind of this run's traffic sends ({} for one process)."""
    if world_size == 1:
        return {}
    momentum = cfg.optimizer_state == "average" and cfg.momentum > 0
    return traffic_precisions(cfg.method, cfg.shared_precision, cfg.shared_topk, cfg.block_precision, momentum)


def summary(
    result: Result, checked: Checked, tensorboard: str | None, engine: str = "local", traffic: dict | None = None
) -> list[str]:
    """The end-of-run block: accuracy, speed, communication, where the files are, what next."""
    t = result.totals
    lines = [
        f"final test accuracy {result.final_accuracy:.2f}% (top-5 {result.final_top5:.2f}%) "
        f"test loss {result.final_loss:.4f} wall {result.wall_s:.1f}s"
    ]
    if t["rounds"]:
        lines.append(
            f"  speed      {t['images'] / max(t['busy_s'], 1e-9):.0f} training images/s (all ranks), "
            f"sync {100 * t['sync_s'] / max(t['busy_s'], 1e-9):.1f}% of a round, "
            f"{t['bytes'] / t['rounds'] / 1e6:.2f} MB sent per round (all ranks)"
        )
    lines.append(f"  engine     {engine}")
    if traffic:
        lines.append("  traffic    " + "; ".join(f"{kind} {what}" for kind, what in traffic.items()))
    lines += [f"  timings    {checked.out}", f"  checkpoint {checked.checkpoint}"]
    if tensorboard:
        lines.append(f"  live view  tensorboard --logdir {tensorboard}")
    lines.append(f"  figures    hist-report {checked.out} -o {checked.out.with_suffix('')}-report")
    return lines
