"""Everything a GPU user hits first, in one command: `tools/gpu-check.sh [--device cpu]`.

Prints one JSON object: each check's result, and the error line where one fails. It needs only
torch and h5py (numpy, Pillow for image folders); hist is imported from this source tree, so
neither `pip install` nor click, Horovod or MPI is needed. Where Horovod, mpi4py and
`horovodrun` are all present, 2 ranks also train on the one GPU (sharing allowed).

Checks, each in a child process of its own so that one failure never hides the next:
- `train-<loader>-<precision>`: one-process hist training through two evaluations, stopped
  after its first checkpoint (the run stops itself after round 3, as on the time-limit signal:
  `--stop-after-rounds`), resumed to the end; the rounds must be complete and unrepeated, and
  the phase times (CUDA events on a GPU) must add up to the wall time of the rounds within 10%;
  images/s, and the data and compute seconds, are recorded. Loaders: the on-device one
  (synthetic 32x32 set) and the streaming one (the Imagewoof sample, or a generated JPEG folder).
- `ranks2-<method>`: IST and dp on 2 ranks under horovodrun (one GPU each on CUDA), and
  `ranks2-torch-<method>` the same under torchrun on the torch.distributed engine (NCCL on
  CUDA, Gloo on a CPU).
- `bare-step-np1`, `bare-step-ranks2`: hist's training step over a bare PyTorch step of the same
  subnetwork (`hist.analysis.steps`, hist-bench's `bare_step_ratio`), one process and IST on
  2 ranks, by width; a measurement beside its target (1.03), never a failure by itself.
What cannot run here is listed under "skipped" with why: a precision the device has no fast
path for (fp16 on a CPU), each engine's 2-rank checks without that engine or its launcher
or, on CUDA, without 2 GPUs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRECISIONS = (("fp32", False), ("bf16", True), ("fp16", True))  # (precision, channels_last)
PHASE_TOLERANCE = 0.10
CHILD_TIMEOUT_S = 150
# Small enough for a 2-core CPU (CI runs this with --device cpu), still two evaluations and a
# checkpoint in between: 8 rounds of 4 steps, an evaluation every half of the run, a checkpoint
# every 2 rounds; the first run stops itself after round 3, past the first checkpoint.
TRAIN = dict(
    arch="preact_resnet34",
    width=0.0625,
    local_iters=4,
    bn_batches=2,
    checkpoint_every=2,
    threads=1,
    seed=0,
)
ARRAY = dict(dataset="synthetic", synthetic_size=512, batch_size=32, epochs=2.0, eval_every_epochs=1.0)
FOLDER = dict(crop=32, eval_resize=36, batch_size=16, epochs=0.5, eval_every_epochs=0.25, workers=1)
STOP_AFTER_ROUNDS = 3
# On a GPU a 4-step round of this model takes 20-40 ms, and the per-round HDF5 append and the
# gathers outside the timed phases would be 10-20% of it. There the rounds are 50 steps of 128
# images on the device (8 rounds again: 200 steps an epoch), and an epoch of 32-image batches
# (18 steps of the 600-image folder) on the streaming loader, with up to 4 decoding workers.
ON_CUDA = {
    "train": dict(local_iters=50),
    "array": dict(synthetic_size=200 * 128, batch_size=128),
    "folder": dict(batch_size=32, local_iters=18, epochs=8.0, eval_every_epochs=4.0),
}


# The bare-step comparison: on a GPU the paper's width too, at the paper's batch; on a CPU only
# the narrow model (a full-width step takes seconds there).
BARE_STEP = {"cpu": dict(widths=(0.0625,), batch=32, pairs=3), "cuda": dict(widths=(0.0625, 1.0), batch=128, pairs=20)}
BARE_STEP_TARGET = 1.03


def sizes(device: str) -> tuple[dict, dict, dict]:
    """(TRAIN, ARRAY, FOLDER) for the device."""
    if device == "cpu":
        return TRAIN, ARRAY, FOLDER
    workers = max(1, min(4, (os.cpu_count() or 2) - 1))
    return (
        {**TRAIN, **ON_CUDA["train"]},
        {**ARRAY, **ON_CUDA["array"]},
        {**FOLDER, **ON_CUDA["folder"], "workers": workers},
    )


def error_line(text: str) -> str:
    """The line that says what went wrong: the last non-empty one of a child's output."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------ the child: one training
def run_training(options: dict) -> int:
    from hist.config import Config
    from hist.errors import HistError
    from hist.launch import run_training as launch

    try:
        result = launch(Config(**options))
    except HistError as e:
        print(f"hist: error: {e}", file=sys.stderr)
        return 2
    return 3 if result.stopped_early else 0


# ------------------------------------------------------------------ the parent: the checks
def on_ranks(cmd: list[str], ranks: int, engine: str = "horovod") -> list[str]:
    """`cmd` on `ranks` ranks of this machine under the engine's own launcher."""
    if engine == "torch":
        return [
            shutil.which("torchrun") or "torchrun",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            "--no-python",
            *cmd,
        ]
    return [shutil.which("horovodrun") or "horovodrun", "-np", str(ranks), "-H", f"localhost:{ranks}", *cmd]


def child(options: dict, env: dict, ranks: int = 1, engine: str = "horovod"):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(options)]
    if ranks > 1:
        cmd = on_ranks(cmd, ranks, engine)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_run(path: Path) -> dict:
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        r = {k: np.asarray(f["rounds"][k]) for k in f["rounds"]}
        e = {k: np.asarray(f["evals"][k]) for k in f["evals"]}
        attrs = dict(f.attrs)
    return {"rounds": r, "evals": e, "attrs": attrs}


def phase_figures(run: dict, batch: int) -> dict:
    """Phase times against wall time over rounds that neither follow an evaluation nor a
    checkpoint (those gaps are outside any round), images/s of the training steps, and the
    seconds spent waiting for data against computing (a loader that cannot feed the device
    shows as data_s near or above compute_s)."""
    import numpy as np

    r = run["rounds"]
    phases = (r["data_s"] + r["compute_s"] + r["sync_s"])[:, 0]
    wall = np.diff(r["wall_s"])
    after = set(run["evals"]["round"].tolist())
    every = int(json.loads(run["attrs"].get("config", "{}")).get("checkpoint_every", 0) or 0)
    resumed = {int(x) for x in run["attrs"].get("resumed_at_round", [])}
    clean = [
        i
        for i in range(1, len(phases))
        if (i - 1) not in after and not (every and i % every == 0) and i not in resumed and wall[i - 1] > 0
    ]
    if not clean:
        return {"phase_ratio": None, "images_per_s": None}
    ratio = float(phases[clean].sum() / wall[[i - 1 for i in clean]].sum())
    images = float(r["steps"][clean].sum() * batch)
    data_s, compute_s = float(r["data_s"][clean, 0].sum()), float(r["compute_s"][clean, 0].sum())
    return {
        "phase_ratio": ratio,
        "images_per_s": images / float(phases[clean].sum()),
        "data_s": round(data_s, 4),
        "compute_s": round(compute_s, 4),
        "data_per_compute": round(data_s / compute_s, 3) if compute_s > 0 else None,
    }


def check_training(name: str, options: dict, out: Path, env: dict) -> dict:
    """Train until the run stops itself after round 3 (past its first checkpoint), as on the
    time-limit signal; resume; look at the file. The run stopping itself cannot lose a race
    with its own pace, as a signal sent once the checkpoint appears could on a fast device."""
    result = {"ok": False, "error": None}
    options = {**options, "out": str(out / f"{name}.h5")}
    t0 = time.time()
    proc = child({**options, "stop_after_rounds": STOP_AFTER_ROUNDS}, env)
    try:
        text, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        result["error"] = f"the first run did not end within {CHILD_TIMEOUT_S} s"
        return result
    if proc.returncode not in (0, 3):
        result["error"] = error_line(text)
        return result
    result["stopped_early"] = proc.returncode == 3
    proc = child({**options, "resume": True}, env)
    try:
        text, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        result["error"] = f"the resumed run did not end within {CHILD_TIMEOUT_S} s"
        return result
    if proc.returncode != 0:
        result["error"] = error_line(text)
        return result
    result["wall_s"] = round(time.time() - t0, 1)
    run = read_run(Path(options["out"]))
    rounds, evals = run["rounds"]["round"].tolist(), run["evals"]["round"].tolist()
    result.update(
        rounds=len(rounds),
        evaluations=len(evals),
        resumed_at_round=[int(x) for x in run["attrs"].get("resumed_at_round", [])],
        final_accuracy=float(run["evals"]["test_accuracy"][-1]) if evals else None,
        status=str(run["attrs"].get("status")),
    )
    result.update(phase_figures(run, options["batch_size"]))
    problems = []
    if rounds != list(range(len(rounds))):
        problems.append(f"rounds missing or repeated after the resume: {rounds}")
    if len(set(evals)) < 2:
        problems.append(f"{len(set(evals))} evaluation(s), expected at least 2")
    if result["status"] != "completed":
        problems.append(f"status {result['status']}")
    if not result["stopped_early"] or result["resumed_at_round"] != [STOP_AFTER_ROUNDS]:
        problems.append(
            f"the first run did not stop after round {STOP_AFTER_ROUNDS} and resume there "
            f"(resumed at {result['resumed_at_round']}): no resume was exercised"
        )
    ratio = result["phase_ratio"]
    if ratio is None or abs(ratio - 1) > PHASE_TOLERANCE:
        problems.append(f"phase times add up to {ratio} of the rounds' wall time (allowed: 1 +- {PHASE_TOLERANCE})")
    result["error"] = "; ".join(problems) or None
    result["ok"] = not problems
    return result


def check_ranks(method: str, device: str, out: Path, env: dict, engine: str = "horovod") -> dict:
    """2 ranks under the engine's launcher: on the CPU sharing it, on CUDA one GPU each (NCCL
    refuses two ranks on one GPU)."""
    train, array, _ = sizes(device)
    options = {**train, **array, "epochs": 1.0, "method": method, "device": device, "share_gpus": device == "cpu"}
    options["backend"] = engine
    options["out"] = str(out / f"{ranks2_name(method, engine)}.h5")
    proc = child(options, env, ranks=2, engine=engine)
    try:
        text, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"ok": False, "error": f"did not end within {CHILD_TIMEOUT_S} s"}
    if proc.returncode != 0:
        return {"ok": False, "error": error_line(text)}
    run = read_run(Path(options["out"]))
    return {
        "ok": str(run["attrs"]["status"]) == "completed",
        "error": None,
        "final_accuracy": float(run["evals"]["test_accuracy"][-1]),
        "bytes_per_round": float(run["rounds"]["bytes_sent"].sum(axis=1).mean()),
    }


def check_bare_step(device: str, env: dict, ranks: int = 1) -> dict:
    """hist's step against the bare step, each width in a child (2 ranks: under horovodrun)."""
    sizes_ = BARE_STEP[device]
    result = {"ok": True, "error": None, "target": BARE_STEP_TARGET, "bare_step_ratio": {}, "step_s": {}}
    for width in sizes_["widths"]:
        cmd = [sys.executable, "-m", "hist.analysis.steps", "--width", str(width), "--batch", str(sizes_["batch"]),
               "--pairs", str(sizes_["pairs"]), "--device", device]  # fmt: skip
        if ranks > 1:
            cmd = on_ranks(cmd, ranks)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {**result, "ok": False, "error": f"width {width}: did not end within {CHILD_TIMEOUT_S} s"}
        lines = [line for line in proc.stdout.splitlines() if "{" in line]
        if proc.returncode or not lines:
            return {**result, "ok": False, "error": error_line(proc.stdout + proc.stderr)}
        figures = json.loads(lines[-1][lines[-1].index("{") :])  # horovodrun tags its lines
        result["bare_step_ratio"][str(width)] = round(figures["bare_step_ratio"], 4)
        result["step_s"][str(width)] = {k: round(figures[k], 5) for k in ("hist_step_s", "bare_step_s")}
    result["met"] = all(v <= BARE_STEP_TARGET for v in result["bare_step_ratio"].values())
    return result


def ranks2_name(method: str, engine: str) -> str:
    return f"ranks2-{method}" if engine == "horovod" else f"ranks2-{engine}-{method}"


def ranks2_skipped(env: dict, device: str, gpus: int, engine: str = "horovod") -> str | None:
    """Why the engine's 2-rank checks cannot run here (None: they can)."""
    if engine == "horovod" and not (env["horovod.torch"] is True and env["mpi4py"] is True and env["horovodrun"]):
        return "Horovod, mpi4py or horovodrun is missing here"
    if engine == "torch" and not (env["torch.distributed"] is True and env["torchrun"]):
        return "torch.distributed or torchrun is missing here"
    if device == "cuda" and gpus < 2:
        return f"{gpus} GPU visible: 2 ranks need 2 GPUs, since NCCL refuses two ranks on one GPU (horovod#3929)"
    return None


def image_folder(out: Path) -> Path:
    """The Imagewoof sample if it is here, else a small JPEG folder made now (real decoding)."""
    for candidate in (os.environ.get("HIST_TEST_IMAGES"), ROOT.parent / "shared" / "data" / "imagewoof-sample"):
        if candidate and (Path(candidate) / "train").is_dir() and (Path(candidate) / "val").is_dir():
            return Path(candidate)
    import numpy as np
    from PIL import Image

    folder = out / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("val", 200)):  # the sample's sizes, which the checks are sized for
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) // (2 if label == "a" else 1)
                Image.fromarray(pixels).save(folder / split / label / f"{i}.jpg", quality=90)
    return folder


def environment(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device != "cpu" and torch.cuda.is_available():
        info.update(
            gpu=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            bf16=torch.cuda.is_bf16_supported(),
            gpus=torch.cuda.device_count(),
        )
    for module in ("horovod.torch", "mpi4py", "PIL", "click"):
        try:
            __import__(module)
            info[module] = True
        except Exception as e:  # ImportError, or a library that fails to load
            info[module] = f"{type(e).__name__}: {str(e)[:120]}"
    if info["horovod.torch"] is True:  # what it was built with (asked without starting it)
        import horovod.torch as hvd

        info["horovod_cuda_built"], info["horovod_nccl_built"] = bool(hvd.cuda_built()), bool(hvd.nccl_built())
    info["horovodrun"] = shutil.which("horovodrun")
    import torch.distributed as dist

    info["torch.distributed"] = dist.is_available()
    info["torchrun"] = shutil.which("torchrun")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", help="Folder for the runs' files [default: a temporary one, removed]")
    parser.add_argument("--only", help="Run the checks whose names contain this")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Checks run at once (default 1: on a GPU each check has it to itself; CI's CPU runs 2)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return run_training(json.loads(args.child))

    started = time.time()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hist-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    report = {"device": args.device, "environment": environment(args.device), "checks": {}, "skipped": {}}
    checks, skipped = report["checks"], report["skipped"]
    try:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            checks["cuda"] = {"ok": False, "error": "torch.cuda.is_available() is False: no usable GPU here"}
        else:
            from hist.engine.precision import precision_supported

            folder = image_folder(out)
            train, array, folder_sizes = sizes(args.device)
            planned = []  # (name, the check): run --jobs at a time, reported in this order
            for precision, channels_last in PRECISIONS:
                # a CPU emulates fp16 (about 90x slower than fp32 on a 2026 Xeon): named as skipped, not run
                no_fast_path = precision_supported(precision, torch.device(args.device))
                for loader, data in (("device", array), ("streaming", {**folder_sizes, "dataset": "imagefolder"})):
                    name = f"train-{loader}-{precision}{'-channels_last' if channels_last else ''}"
                    if args.only and args.only not in name:
                        continue
                    if no_fast_path:
                        skipped[name] = no_fast_path
                        continue
                    options = {**train, **data, "precision": precision, "channels_last": channels_last}
                    options["device"] = args.device
                    if loader == "streaming":
                        options["data_dir"] = str(folder)
                    planned.append((name, functools.partial(check_training, name, options, out, env)))
            if not args.only or args.only in "bare-step-np1":
                planned.append(("bare-step-np1", functools.partial(check_bare_step, args.device, env)))
            gpus = torch.cuda.device_count() if args.device == "cuda" else 0
            for engine in ("horovod", "torch"):
                why_not = ranks2_skipped(report["environment"], args.device, gpus, engine)
                if why_not:
                    skipped[ranks2_name("*", engine)] = why_not
                    if engine == "horovod":
                        skipped["bare-step-ranks2"] = why_not
                    continue
                for method in ("ist", "dp"):
                    name = ranks2_name(method, engine)
                    if not args.only or args.only in name:
                        planned.append((name, functools.partial(check_ranks, method, args.device, out, env, engine)))
                if engine == "horovod" and (not args.only or args.only in "bare-step-ranks2"):
                    planned.append(("bare-step-ranks2", functools.partial(check_bare_step, args.device, env, ranks=2)))
            with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
                done = [(name, pool.submit(check)) for name, check in planned]
                for name, future in done:
                    checks[name] = future.result()
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    report["images_per_s"] = {n: c.get("images_per_s") for n, c in checks.items() if c.get("images_per_s")}
    report["ok"] = bool(checks) and all(c["ok"] for c in checks.values())
    report["wall_s"] = round(time.time() - started, 1)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
