"""One launch function for a laptop, `horovodrun`, `mpirun` or `srun`: wire the parts and train.

Everything that can be checked identically on every rank (options, data files, the output
folder) is checked before MPI starts, so bad input ends every rank with the same clear line.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import data as datasets
from .config import Config
from .errors import CollectiveError, HistError
from .models import BLOCK_COUNTS, build_model
from .plan import validate as validate_plan
from .runlock import RunLock
from .timings import TimingWriter
from .train import Result, StopFlag, train
from .world import world_info_from_env


def resolve_device(choice: str, local_rank: int):
    import torch
    if choice == "cpu":
        return torch.device("cpu")
    usable = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if usable:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if choice == "cuda":
        raise HistError("--device cuda but no usable CUDA device; use --device cpu or auto")
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        warnings.warn(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} but CUDA is not "
                      f"usable here; training on the CPU")
    return torch.device("cpu")


def default_out(cfg: Config, world_size: int) -> Path:
    job = os.environ.get("SLURM_JOB_ID")
    method = cfg.method if world_size > 1 else "single"
    return Path("runs") / f"{method}-{cfg.dataset}-np{world_size}{'-' + job if job else ''}.h5"


def check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HistError(f"cannot create the folder of --out {path}: {e.strerror}; choose a writable place")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HistError(f"cannot write --out {path}: permission denied; choose a writable place")


def versions(sync, device) -> dict:
    import h5py
    import numpy
    import torch
    import horovod
    from . import __version__
    info = {"hist": __version__, "torch": torch.__version__, "horovod": horovod.__version__,
            "mpi": sync.MPI.Get_library_version().splitlines()[0].strip(), "numpy": numpy.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "python": sys.version.split()[0],
            "cuda": torch.version.cuda or "none", "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_training(cfg: Config) -> Result:
    cfg.validate()
    world = world_info_from_env()
    if cfg.dataset not in datasets.DATASETS:
        raise HistError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(datasets.DATASETS)}")
    arch_depth = cfg.arch.removeprefix("preact_resnet")
    if not arch_depth.isdigit() or int(arch_depth) not in BLOCK_COUNTS:
        raise HistError(f"unknown --arch {cfg.arch!r}; choose preact_resnet18, 34, 101 or 152")
    subnets = cfg.subnets or (world.size if cfg.method == "ist" else 1)
    if cfg.method != "ist":
        subnets = 1
    try:
        validate_plan(BLOCK_COUNTS[int(arch_depth)][2] - 1, subnets, cfg.min_depth)
    except ValueError as e:
        raise HistError(str(e))
    if world.size % subnets:
        raise HistError(f"{world.size} processes cannot form {subnets} equal subnetworks; "
                        f"launch a multiple of --subnets processes")
    out = Path(cfg.out) if cfg.out else default_out(cfg, world.size)
    check_writable(out)
    checkpoint_path = Path(cfg.checkpoint) if cfg.checkpoint else out.with_suffix(".ckpt.pt")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, world.local_rank)
    train_split, test_split = datasets.load(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None,
                                            cfg.seed, synthetic_size=cfg.synthetic_size)

    stop = StopFlag(cfg.stop_signal)
    stop.install()  # before MPI starts, so an early SIGTERM is not lost
    from .sync import Synchroniser
    on_cpu = device.type == "cpu"
    sync = Synchroniser(subnets, cycle_time_ms=50 if on_cpu else None, yield_when_idle=on_cpu)
    options_digest = hashlib.sha256(json.dumps(cfg.as_dict(), sort_keys=True).encode()).digest()
    sync.check_same(int.from_bytes(options_digest[:7], "little"), "options")
    # Rank 0 owns the output files; every rank learns whether another run holds them.
    lock, lock_error = None, None
    if sync.rank == 0:
        try:
            lock = RunLock([out, checkpoint_path])
        except HistError as e:
            lock_error = e
    if sync.any_over_world(lock_error is not None):
        raise CollectiveError(str(lock_error) if lock_error else "another run holds the output files")
    identity = {**{k: getattr(cfg, k) for k in ckpt.IDENTITY_KEYS if hasattr(cfg, k)},
                "subnets": subnets, "world_size": sync.size}
    resume_state = None
    if cfg.resume and checkpoint_path.is_file():
        try:  # every rank reads the same file and fails the same way: say it once
            resume_state = ckpt.load(checkpoint_path, identity)
        except HistError as e:
            raise CollectiveError(str(e)) from None

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, datasets.NUM_CLASSES[cfg.dataset], cfg.width).to(device)
    train_data = datasets.DeviceLoader(train_split, cfg.dataset, cfg.batch_size, device, cfg.seed,
                                       sync.rank, sync.size, augment=True)
    test_data = datasets.DeviceLoader(test_split, cfg.dataset, cfg.eval_batch_size, device, cfg.seed,
                                      augment=False)
    hosts = sync.world.allgather(world.host)
    recorder, start_error = None, None
    if sync.rank == 0:
        meta = {"method": cfg.method if sync.size > 1 else "single", "dataset": cfg.dataset,
                "arch": cfg.arch, "width": cfg.width, "world_size": sync.size, "subnets": subnets,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "hosts": hosts,
                "versions": versions(sync, device), "config": cfg.as_dict(),
                "train_images": len(train_data), "test_images": len(test_data),
                "steps_per_epoch": train_data.steps_per_epoch}
        try:
            recorder = TimingWriter(out, meta, sync.size, resume_state["round"] if resume_state else 0)
        except HistError as e:
            start_error = e
    if sync.any_over_world(start_error is not None):
        raise CollectiveError(str(start_error) if start_error else "rank 0 could not create the timing file")
    log = print if sync.rank == 0 else (lambda *a, **k: None)
    log(f"hist-train {cfg.method} on {cfg.dataset}: {sync.size} process(es), {subnets} subnetwork(s), "
        f"{cfg.arch} width {cfg.width}, device {device}, timings -> {out}")
    result = train(cfg, model, sync, train_data, test_data, recorder, checkpoint_path, log, stop,
                   resume_state, identity)
    if recorder is not None:
        recorder.finish("interrupted" if result.stopped_early else "completed", result.wall_s)
    if lock is not None:
        lock.release()
    if not result.stopped_early:
        log(f"final test accuracy {result.final_accuracy:.2f}% test loss {result.final_loss:.4f} "
            f"wall {result.wall_s:.1f}s")
    return result
