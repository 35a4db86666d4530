"""hist-bench: the figures behind the performance claims, measured on this machine.

Everything is measured or counted by the same code the training uses: step times with
warm-up, bytes from the synchronisation schedule, end-to-end epochs from real `hist-train`
runs (one process against 2 ranks), accuracy from real runs on CIFAR-10 when
`--data-dir`/`HIST_DATA` has it (else the synthetic set, and the result says so).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import data as datasets
from ..choices import BACKENDS, BLOCK_PRECISIONS, PRECISIONS, SHARED_PRECISIONS, SINGLE
from ..comm import connect, horovod_version, ring_allreduce_bytes, round_bytes
from ..comm.traffic import average_bytes, topk_per_chunk
from ..engine.precision import Precision, precision_supported
from ..io.timings import read_run
from ..models import build_model, conv_flops, make_plan, shared_and_partitioned
from ..world import cpu_description
from .steps import measure as bare_step
from .suite import on_local_ranks

# The engines `hist-bench engines` compares, each under its own launcher (`suite.on_local_ranks`).
ENGINES = tuple(b for b in BACKENDS if b != "auto")

# ResIST paper, ResNet-101 on CIFAR-100, GB per round, all machines (Table in Dun et al., 2022).
PUBLISHED_GB = {"ist": {"2": 0.454, "4": 0.720, "8": 1.289}, "local-sgd": {"2": 0.662, "4": 1.325, "8": 2.649}}


# The longest one figure of the step timings may take: on a CPU without a fast path, a
# half-precision step can take many seconds (the figure then rests on fewer steps).
FIGURE_BUDGET_S = 20.0


def _time_steps(
    model, x, y, steps: int, warmup: int, precision: str = "fp32", budget_s: float = FIGURE_BUDGET_S
) -> float:
    """Fastest of `steps` SGD training steps after warm-up (the least disturbed by other load),
    through the training's own precision switch; at least one step is timed, and none starts
    once `budget_s` has passed."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = Precision(precision, x.device)
    times = []
    start = time.perf_counter()
    for i in range(warmup + steps):
        if times and time.perf_counter() - start > budget_s:
            break
        warming = i < warmup and time.perf_counter() - start <= budget_s / 2
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with amp.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        amp.backward(loss)
        amp.step(opt)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if not warming:
            times.append(time.perf_counter() - t)
    return min(times)


def subnet_step_ratio(width: float, batch: int, device, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = build_model("preact_resnet101", 10, width).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    n = len(model.partitioned_blocks())
    full = _time_steps(model, x, y, steps, warmup)
    full_flops = conv_flops(model, range(n))
    out = {"step_s_full": full, "ratio": {}, "flops_ratio": {}}
    for s in (2, 4, 8):
        blocks = make_plan(0, 0, n, s).blocks[0]
        model.set_subnetwork(blocks)
        out["ratio"][str(s)] = _time_steps(model, x, y, steps, warmup) / full
        out["flops_ratio"][str(s)] = conv_flops(model, blocks) / full_flops
        model.set_full()
    return out


def precision_layout(width: float, batch: int, device, steps: int, warmup: int) -> list[dict]:
    """Training images/s of the full ResNet-101 and of an S=8 subnetwork, per precision and
    memory layout."""
    rows = []
    for precision in PRECISIONS:
        why = precision_supported(precision, device)
        if why:
            rows.append({"precision": precision, "skipped": why})
            continue
        for channels_last in (False, True):
            layout = torch.channels_last if channels_last else torch.contiguous_format
            torch.manual_seed(0)
            model = build_model("preact_resnet101", 10, width).to(device).to(memory_format=layout)
            x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
            y = torch.randint(0, 10, (batch,), device=device)
            row = {"precision": precision, "channels_last": channels_last}
            row["full_images_per_s"] = batch / _time_steps(model, x, y, steps, warmup, precision)
            model.set_subnetwork(make_plan(0, 0, len(model.partitioned_blocks()), 8).blocks[0])
            row["s8_images_per_s"] = batch / _time_steps(model, x, y, steps, warmup, precision)
            rows.append(row)
    return rows


def bytes_per_round(local_iters: int = 50, rounds: int = 20) -> dict:
    """Bytes sent per round by all ranks together, ResNet-101 with a CIFAR-100 head (fp32)."""
    model = build_model("preact_resnet101", 100, 1.0)
    shared, blocks = shared_and_partitioned(model)
    shared_b = sum(p.numel() * 4 for p in shared)
    block_b = [sum(p.numel() * 4 for p in ps) for ps in blocks]
    full_b = shared_b + sum(block_b)
    # With --optimizer-state average (the default) the momentum buffers travel with their
    # weights: twice the bytes of a round; "-restart" is the reference treatment.
    out = {"ist": {}, "ist-restart": {}, "ist-fp16-restart": {}, "local-sgd": {}, "local-sgd-restart": {}, "dp": {}}
    for n in (2, 4, 8):
        ring = n * ring_allreduce_bytes(1.0, n)  # sent by all ranks for one allreduce, per byte of payload
        sent = [
            round_bytes(
                make_plan(0, r, len(blocks), n), make_plan(0, r + 1, len(blocks), n), 1, "copy", block_b, shared_b
            )[0]
            for r in range(rounds)
        ]
        out["ist-restart"][str(n)] = float(np.mean(sent))
        out["ist"][str(n)] = 2 * out["ist-restart"][str(n)]
        out["ist-fp16-restart"][str(n)] = out["ist-restart"][str(n)] - ring * shared_b / 2  # --shared-precision fp16
        out["local-sgd-restart"][str(n)] = ring * full_b
        out["local-sgd"][str(n)] = 2 * ring * full_b
        out["dp"][str(n)] = ring * full_b * local_iters
    return out


def setting_bytes(rounds: int = 20, topks=(0.0, 0.01)) -> list[dict]:
    """Bytes per round, all ranks together, of every `--shared-precision`, `--shared-topk` in
    `topks` and (IST) `--block-precision`, at S = N = 2, 4, 8: ResNet-101 with a CIFAR-100 head,
    momentum averaged (the default), steady rounds (towards the next plan), counted by the
    live run's own functions (`comm.round_bytes`, `comm.traffic.average_bytes`)."""
    model = build_model("preact_resnet101", 100, 1.0)
    shared, blocks = shared_and_partitioned(model)
    carried = 2  # the weights and their momentum buffers travel together
    shared_n = carried * sum(p.numel() for p in shared)
    block_b = [carried * 4 * sum(p.numel() for p in ps) for ps in blocks]
    full_n = shared_n + sum(block_b) // 4
    plans = {n: [make_plan(0, r, len(blocks), n) for r in range(rounds + 1)] for n in (2, 4, 8)}
    rows = []
    for precision in SHARED_PRECISIONS:
        for topk in topks:
            k = topk_per_chunk(topk)
            row = {"method": "local-sgd", "shared": precision, "topk": topk, "blocks": "-"}
            rows.append(row | {str(n): average_bytes(full_n, precision, k, n) for n in (2, 4, 8)})
            for block_precision in BLOCK_PRECISIONS:
                row = {"method": "ist", "shared": precision, "topk": topk, "blocks": block_precision}
                for n, ps in plans.items():
                    sent = [
                        round_bytes(ps[r], ps[r + 1], 1, "copy", block_b, 4 * shared_n, precision, k, block_precision)[
                            0
                        ]
                        for r in range(rounds)
                    ]
                    row[str(n)] = float(np.mean(sent))
                rows.append(row)
    fp32 = next(r for r in rows if r["method"] == "local-sgd" and r["shared"] == "fp32" and not r["topk"])
    for row in rows:
        alike = next(
            r for r in rows if r["method"] == "local-sgd" and (r["shared"], r["topk"]) == (row["shared"], row["topk"])
        )
        row["vs_fp32_local_sgd"] = {n: row[n] / fp32[n] for n in ("2", "4", "8")}
        row["vs_local_sgd_alike"] = {n: row[n] / alike[n] for n in ("2", "4", "8")}
    return rows


def format_setting_bytes(rows: list[dict]) -> str:
    """The bytes table in Markdown: GB per round at 2, 4, 8, then the ratios at 8."""
    lines = [
        "| method | shared | top-k | blocks | GB/round N=2 | N=4 | N=8 | vs fp32 local SGD, N=8 | vs local SGD alike, N=8 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        gb = " | ".join(f"{r[n] / 1e9:.4f}" for n in ("2", "4", "8"))
        lines.append(
            f"| {r['method']} | {r['shared']} | {r['topk'] or '-'} | {r['blocks']} | {gb} | "
            f"{r['vs_fp32_local_sgd']['8']:.4f} | {r['vs_local_sgd_alike']['8']:.3f} |"
        )
    return "\n".join(lines)


def pipeline_ratio(width: float, batch: int, device, steps: int, warmup: int) -> dict:
    train, _ = datasets.synthetic(0, 4096, 256)
    loader = datasets.DeviceLoader(train, "synthetic", batch, device, 0)
    for i in range(warmup):
        loader.batch(i)
    t = time.perf_counter()
    n = max(20, steps * 4)
    for i in range(n):
        x, _ = loader.batch(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    data_ips = n * batch / (time.perf_counter() - t)
    torch.manual_seed(0)
    model = build_model("preact_resnet101", 10, width).to(device)
    xb, yb = loader.batch(0)
    model_ips = batch / _time_steps(model, xb, yb, steps, warmup)
    return {"data_images_per_s": data_ips, "model_images_per_s": model_ips, "ratio": data_ips / model_ips}


def streaming_throughput(
    dataset: str,
    data_dir: str,
    arch: str,
    width: float,
    crop: int,
    resize: int,
    batch: int,
    workers: int,
    device,
    batches: int = 30,
    warmup: int = 3,
) -> dict:
    """Images/s of the streaming loader (training transform, decoding workers, normalised on
    the device) against the training images/s of the model it feeds, at the same crop."""
    train = datasets.index_folder(dataset, data_dir, "train")
    loader = datasets.StreamingLoader(train, dataset, batch, device, 0, crop=crop, resize=resize, workers=workers)
    try:
        for i in range(warmup):
            loader.batch(i)
        t = time.perf_counter()
        for i in range(warmup, warmup + batches):
            x, y = loader.batch(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        loader_ips = batches * batch / (time.perf_counter() - t)
    finally:
        loader.close()
    torch.manual_seed(0)
    model = build_model(arch, datasets.num_classes(dataset, train), width).to(device)
    step_s = _time_steps(model, x, y, max(3, batches // 5), warmup)
    return {
        "dataset": dataset,
        "train_images": len(train),
        "arch": arch,
        "width": width,
        "crop": crop,
        "batch_size": batch,
        "workers": workers,
        "loader_images_per_s": loader_ips,
        "model_images_per_s": batch / step_s,
        "ratio": loader_ips * step_s / batch,
    }


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _train(args: list[str], np_: int, tmp: Path, env: dict, device: str = "cpu", backend: str = "auto"):
    """One hist-train run on `device` under `backend`'s launcher, read back; several ranks on one
    machine share its GPU on purpose. A run with the same options and ranks is trained once per
    benchmark (`tmp`): two phases that need the same run (the quick bench's IST epoch and its
    overlapping sync) share it."""
    key = hashlib.sha1(repr((args, np_, device, backend)).encode()).hexdigest()[:12]
    out = tmp / f"run-np{np_}-{key}.h5"
    if not out.exists():
        cmd = [_bin("hist-train"), *args, "--device", device, "--backend", backend, "--out", str(out)]
        if np_ > 1:
            cmd = on_local_ranks(np_, [*cmd, "--share-gpus"], backend)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            out.unlink(missing_ok=True)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return read_run(out)


def _env() -> dict:
    """The caller's environment (launcher settings are theirs: root, oversubscription), one
    thread a process, and this Python's launchers first on the PATH."""
    return dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def _synthetic_epoch(width: float, batch: int, local_iters: int, synthetic_size: int) -> list[str]:
    """hist-train options for one epoch of ResNet-101 on the synthetic set, one thread a process."""
    return [
        "synthetic",
        "--arch",
        "preact_resnet101",
        "--width",
        str(width),
        "--batch-size",
        str(batch),
        "--local-iters",
        str(local_iters),
        "--synthetic-size",
        str(synthetic_size),
        "--threads",
        "1",
        "--epochs",
        "1",
        "--bn-batches",
        "1",
    ]


def end_to_end(
    width: float,
    batch: int,
    local_iters: int,
    synthetic_size: int,
    tmp: Path,
    device: str = "cpu",
    backend: str = "auto",
) -> dict:
    """Wall time per epoch: one full-model process against 2-process ist, local-sgd and dp."""
    common = _synthetic_epoch(width, batch, local_iters, synthetic_size)
    env = _env()
    single = _train(common, 1, tmp, env, device, backend)
    base = single.rounds["wall_s"][-1] / single.rounds["epoch"][-1]
    out = {"seconds_per_epoch": {SINGLE: float(base)}, "speedup_np2": {}, "sync_share": None}
    for method in ("ist", "local-sgd", "dp"):
        run = _train(common + ["--method", method], 2, tmp, env, device, backend)
        per_epoch = float(run.rounds["wall_s"][-1] / run.rounds["epoch"][-1])
        out["seconds_per_epoch"][method] = per_epoch
        out["speedup_np2"][method] = base / per_epoch
        if method == "ist":
            # rounds that end in an evaluation or checkpoint send every block everywhere; the
            # steady state is the rounds before the last one
            r = run.rounds
            busy = r["compute_s"] + r["data_s"] + r["sync_s"]
            steady = slice(0, max(1, len(busy) - 1))
            out["sync_share"] = float((r["sync_s"][steady] / busy[steady]).mean())
            out["ist_rounds"] = int(len(busy))
    return out


def sync_overlap(
    width: float,
    batch: int,
    local_iters: int,
    synthetic_size: int,
    tmp: Path,
    device: str = "cpu",
    backend: str = "auto",
) -> dict:
    """A round's sync time of 2-process IST with the block transfers overlapping the shared
    allreduce and without (real hist-train runs; steady rounds, the last one left out)."""
    common = _synthetic_epoch(width, batch, local_iters, synthetic_size)
    out = {}
    for name, flags in (("no-overlap", ["--no-overlap"]), ("overlap", [])):  # overlap: hist-train's default
        r = _train(common + ["--method", "ist", *flags], 2, tmp, _env(), device, backend).rounds
        steady = slice(0, max(1, len(r["sync_s"]) - 1))
        out[name] = float(r["sync_s"][steady].max(axis=1).mean())
    return {"sync_s_per_round": out, "rounds": int(len(r["sync_s"]))}


def accuracy(data_dir, epochs: float, tmp: Path, device: str = "cpu", backend: str = "auto") -> dict:
    """Final test accuracy of one full-model process and of IST with 2 and 4 subnetworks."""
    data_dir = data_dir or os.environ.get("HIST_DATA")
    dataset = "cifar10" if data_dir and (Path(data_dir) / "cifar-10-batches-py").is_dir() else "synthetic"
    common = [
        dataset,
        "--arch",
        "preact_resnet34",
        "--width",
        "0.125",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--local-iters",
        "10",
        "--epochs",
        str(epochs),
        "--threads",
        "1",
    ]
    if dataset == "cifar10":
        common += ["--data-dir", str(data_dir)]
    env = _env()
    out = {"dataset": dataset}
    for key, np_ in ((SINGLE, 1), ("ist_s2", 2), ("ist_s4", 4)):
        out[key] = float(_train(common, np_, tmp, env, device, backend).evals["test_accuracy"][-1])
    return out


def _steady(values) -> np.ndarray:
    """The rounds before the last (which sends every block for the final evaluation)."""
    return values[: max(1, len(values) - 1)]


def engines(
    methods: list[str], repeats: int, width: float, batch: int, local_iters: int, synthetic_size: int, device: str
) -> dict:
    """Seconds per epoch and a round's synchronisation (slowest rank, steady rounds) of each
    method at 2 processes under Horovod + MPI and under torch.distributed, in one benchmark:
    the runs alternate, each engine first in turn, so slow drifts of the machine fall on both."""
    common = _synthetic_epoch(width, batch, local_iters, synthetic_size)
    runs = {(m, e): [] for m in methods for e in ENGINES}
    for i in range(repeats):
        order = ENGINES if i % 2 == 0 else ENGINES[::-1]
        with tempfile.TemporaryDirectory() as tmp:
            for method in methods:
                for engine in order:
                    r = _train(common + ["--method", method], 2, Path(tmp), _env(), device, engine).rounds
                    runs[(method, engine)].append(
                        {
                            "seconds_per_epoch": float(r["wall_s"][-1] / r["epoch"][-1]),
                            "sync_s_per_round": float(_steady(r["sync_s"].max(axis=1)).mean()),
                        }
                    )
    out: dict = {"settings": {"methods": methods, "repeats": repeats, "width": width, "batch_size": batch,
                              "local_iters": local_iters, "synthetic_size": synthetic_size, "device": device}}  # fmt: skip
    for method in methods:
        row = {}
        for engine in ENGINES:
            for key in ("seconds_per_epoch", "sync_s_per_round"):
                row.setdefault(key, {})[engine] = float(np.median([x[key] for x in runs[(method, engine)]]))
                row.setdefault(f"{key}_runs", {})[engine] = [x[key] for x in runs[(method, engine)]]
        for key in ("seconds_per_epoch", "sync_s_per_round"):
            row[f"{key}_torch_over_horovod"] = row[key]["torch"] / row[key]["horovod"]
        out[method] = row
    out["machine"] = machine()
    out["command"] = " ".join(["hist-bench"] + sys.argv[1:])
    return out


def format_engines(r: dict) -> str:
    lines = [
        "method  engine   s/epoch  round sync s   (medians of "
        f"{r['settings']['repeats']} runs each, 2 processes, width {r['settings']['width']})"
    ]
    for method in r["settings"]["methods"]:
        row = r[method]
        for engine in ENGINES:
            lines.append(
                f"{method:7s} {engine:8s} {row['seconds_per_epoch'][engine]:7.3f}  {row['sync_s_per_round'][engine]:12.4f}"
            )
        lines.append(
            f"{method:7s} torch / horovod: {row['seconds_per_epoch_torch_over_horovod']:.2f}x per epoch, "
            f"{row['sync_s_per_round_torch_over_horovod']:.2f}x round sync"
        )
    return "\n".join(lines)


def bare_steps(widths, batch: int, pairs: int, device, launch: bool) -> dict:
    """hist's step over a bare PyTorch step of the same subnetwork (`steps`): one process (the
    full model) in this process, and 2-process IST (one subnetwork a rank) in a launched job."""
    out = {"np1": {}, "ist_np2": {}, "step_s": {}}
    for width in widths:
        one = bare_step(connect(1, 1), width, batch, pairs, device)
        out["np1"][str(width)] = one["bare_step_ratio"]
        out["step_s"][f"np1-{width}"] = {k: one[k] for k in ("hist_step_s", "bare_step_s")}
        if launch:
            cmd = on_local_ranks(2, [sys.executable, "-m", "hist.analysis.steps", "--width", str(width),
                                     "--batch", str(batch), "--pairs", str(pairs), "--device", device.type])  # fmt: skip
            proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            line = [x for x in proc.stdout.splitlines() if "{" in x][-1]  # mpirun (--tag-output) tags each line
            two = json.loads(line[line.index("{") :])
            out["ist_np2"][str(width)] = two["bare_step_ratio"]
            out["step_s"][f"ist_np2-{width}"] = {k: two[k] for k in ("hist_step_s", "bare_step_s")}
    return out


def can_launch(backend: str = "horovod") -> bool:
    """Whether this Python has the launcher of `backend`, for the multi-process figures."""
    return shutil.which(_bin("torchrun" if backend == "torch" else "horovodrun")) is not None


def format_bare_steps(b: dict) -> str:
    return "hist step / bare PyTorch step of the same subnetwork (by width): one process " + (
        ", ".join(f"{w} {v:.3f}" for w, v in b["np1"].items())
        + ("; IST 2 processes " + ", ".join(f"{w} {v:.3f}" for w, v in b["ist_np2"].items()) if b["ist_np2"] else "")
    )


def machine() -> dict:
    import h5py

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "h5py": h5py.__version__,
        **cpu_description(),
        "cores": os.cpu_count(),
        "host": platform.node(),
    }
    if horovod_version():
        info["horovod"] = horovod_version()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(
    quick: bool,
    width: float,
    batch_size: int,
    device,
    data_dir=None,
    skip_runs: bool = False,
    run_width: float = 0.125,
    backend: str = "auto",
) -> dict:
    torch.set_num_threads(1)
    steps, warmup = (2, 1) if quick else (8, 3)
    t0 = time.time()
    phase_s = {}  # where the benchmark's own time goes, phase by phase

    def timed(name, fn, *args):
        start = time.time()
        out = fn(*args)
        phase_s[name] = time.time() - start
        return out

    step = timed("subnet_step_ratio", subnet_step_ratio, width, batch_size, device, steps, warmup)
    result = {
        "subnet_step_ratio": step["ratio"],
        "subnet_flops_ratio": step["flops_ratio"],
        "step_s_full": step["step_s_full"],
        "bytes_per_round": bytes_per_round(),
        "published_gb_per_round": PUBLISHED_GB,
    }
    launch = not skip_runs and can_launch(backend)
    result["bare_step_ratio"] = timed(
        "bare_step",
        bare_steps,
        (0.0625,) if quick else (0.0625, 0.25),
        batch_size,
        3 if quick else 10,
        device,
        launch and can_launch(),  # its IST figure runs `python -m hist.analysis.steps` on 2 Horovod ranks
    )
    result["precision_layout"] = timed("precision_layout", precision_layout, width, batch_size, device, steps, warmup)
    pipe = timed("pipeline", pipeline_ratio, width, batch_size, device, steps, warmup)
    result["pipeline_ratio"] = pipe["ratio"]
    result["pipeline"] = pipe
    if launch:
        with tempfile.TemporaryDirectory() as tmp:
            e2e = timed(
                "end_to_end",
                end_to_end,
                0.0625 if quick else run_width,
                16 if quick else batch_size,
                4 if quick else 50,
                256 if quick else 50 * batch_size * 4,
                Path(tmp),
                device.type,
                backend,
            )
            result.update(e2e)
            result["overlap"] = timed(
                "overlap",
                sync_overlap,
                0.0625 if quick else run_width,
                16 if quick else batch_size,
                4 if quick else 10,
                256 if quick else 10 * batch_size * 2 * 12,
                Path(tmp),
                device.type,
                backend,
            )
            result["accuracy"] = timed(
                "accuracy", accuracy, data_dir, 0.2 if quick else 3, Path(tmp), device.type, backend
            )
    result["settings"] = {
        "width": width,
        "run_width": run_width,
        "batch_size": batch_size,
        "device": str(device),
        "quick": quick,
        "backend": backend,
        "threads_per_process": 1,
    }
    result["machine"] = machine()
    result["command"] = " ".join(["hist-bench"] + sys.argv[1:])
    result["bench_s"] = time.time() - t0
    result["phase_s"] = phase_s
    return result


def format_table(r: dict) -> str:
    lines = [
        f"hist-bench on {r['machine'].get('gpu', r['machine']['cpu'])} ({r['settings']['device']}), "
        f"ResNet-101 width {r['settings']['width']}, batch {r['settings']['batch_size']}"
    ]
    lines.append(
        "subnetwork step time / full model (S=2,4,8): "
        + ", ".join(
            f"{r['subnet_step_ratio'][s]:.3f} (FLOPs {r['subnet_flops_ratio'][s]:.3f})" for s in ("2", "4", "8")
        )
    )
    for m in ("ist", "ist-restart", "ist-fp16-restart", "local-sgd", "local-sgd-restart", "dp"):
        lines.append(
            f"bytes per round, {m:17s} (S/N=2,4,8): "
            + ", ".join(f"{r['bytes_per_round'][m][s] / 1e9:.3f} GB" for s in ("2", "4", "8"))
            + (
                "  published: " + ", ".join(f"{v:.3f}" for v in PUBLISHED_GB[m.split("-restart")[0]].values())
                if m.split("-restart")[0] in PUBLISHED_GB
                else ""
            )
        )
    lines.append(format_bare_steps(r["bare_step_ratio"]))
    lines.append("training images/s by precision and layout (ResNet-101 full / S=8 subnetwork):")
    for row in r["precision_layout"]:
        if "skipped" in row:
            lines.append(f"  {row['precision']:4s} not measured: {row['skipped']}")
            continue
        layout = "channels_last" if row["channels_last"] else "NCHW"
        lines.append(
            f"  {row['precision']:4s} {layout:13s} {row['full_images_per_s']:9.1f} / {row['s8_images_per_s']:9.1f}"
        )
    lines.append(f"data pipeline / model images per second: {r['pipeline_ratio']:.1f}x")
    if "speedup_np2" in r:
        lines.append(
            "speedup of 2 processes over 1 (wall per epoch): "
            + ", ".join(f"{m} {v:.2f}x" for m, v in r["speedup_np2"].items())
        )
        lines.append(f"IST sync share of a round: {100 * r['sync_share']:.2f}%")
        o = r["overlap"]["sync_s_per_round"]
        lines.append(
            f"IST sync time of a round (2 processes, slowest rank): {o['no-overlap']:.3f} s sequential, "
            f"{o['overlap']:.3f} s with the block transfers overlapping the shared allreduce"
        )
        a = r["accuracy"]
        lines.append(
            f"accuracy on {a['dataset']}: single {a['single']:.2f}%, IST S=2 {a['ist_s2']:.2f}%, "
            f"IST S=4 {a['ist_s4']:.2f}%"
        )
    lines.append(f"({r['bench_s']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["phase_s"].items()) + ")")
    return "\n".join(lines)
