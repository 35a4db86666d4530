"""Everything a GPU user hits first, in one command: `tools/gpu-check.sh [--device cpu]`.

Prints one JSON object: each check's result, and the error line where one fails. It needs only
torch and h5py (numpy, Pillow for image folders); hist is imported from this source tree, so
neither `pip install` nor click, Horovod or MPI is needed. Where Horovod, mpi4py and
`horovodrun` are all present, 2 ranks also train on the one GPU (sharing allowed).

Checks, each in a child process of its own so that one failure never hides the next:
- `train-<loader>-<precision>`: one-process hist training through two evaluations, stopped by
  the time-limit signal after its first checkpoint, resumed to the end; the rounds must be
  complete and unrepeated, and the phase times (CUDA events on a GPU) must add up to the wall
  time of the rounds within 10%; images/s is recorded. Loaders: the on-device one (synthetic
  32x32 set) and the streaming one (the Imagewoof sample, or a generated JPEG folder).
- `ranks2-<method>`: IST and dp on 2 ranks (same device) under horovodrun.
A precision the device has no fast path for (fp16 on a CPU) is listed under "skipped" with why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
# checkpoint in between: 4-step rounds, an evaluation every half of the run.
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
def child(options: dict, env: dict, ranks: int = 1):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(options)]
    if ranks > 1:
        cmd = [shutil.which("horovodrun") or "horovodrun", "-np", str(ranks), "-H", f"localhost:{ranks}", *cmd]
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
    checkpoint (those gaps are outside any round), and images/s of the training steps."""
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
    return {"phase_ratio": ratio, "images_per_s": images / float(phases[clean].sum())}


def check_training(name: str, options: dict, out: Path, env: dict) -> dict:
    """Train, stop on the signal after the first checkpoint, resume, and look at the file."""
    result = {"ok": False, "error": None}
    options = {**options, "out": str(out / f"{name}.h5")}
    ckpt = out / f"{name}.ckpt.pt"
    t0 = time.time()
    proc = child(options, env)
    deadline = time.time() + CHILD_TIMEOUT_S
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if proc.poll() is None and ckpt.exists():
        proc.send_signal(signal.SIGUSR2)  # the time-limit warning: checkpoint at the round end, exit 3
    try:
        text, _ = proc.communicate(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        result["error"] = f"the first run did not end within {CHILD_TIMEOUT_S} s"
        return result
    if proc.returncode not in (0, 3):
        result["error"] = error_line(text)
        return result
    result["stopped_on_signal"] = proc.returncode == 3
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
    if not result["stopped_on_signal"]:
        problems.append("the run ended before the signal could stop it (no resume was exercised)")
    ratio = result["phase_ratio"]
    if ratio is None or abs(ratio - 1) > PHASE_TOLERANCE:
        problems.append(f"phase times add up to {ratio} of the rounds' wall time (allowed: 1 +- {PHASE_TOLERANCE})")
    result["error"] = "; ".join(problems) or None
    result["ok"] = not problems
    return result


def check_ranks(method: str, device: str, out: Path, env: dict) -> dict:
    options = {**TRAIN, **ARRAY, "epochs": 1.0, "method": method, "device": device, "share_gpus": True}
    options["out"] = str(out / f"ranks2-{method}.h5")
    proc = child(options, env, ranks=2)
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


def image_folder(out: Path) -> Path:
    """The Imagewoof sample if it is here, else a small JPEG folder made now (real decoding)."""
    for candidate in (os.environ.get("HIST_TEST_IMAGES"), ROOT.parent / "shared" / "data" / "imagewoof-sample"):
        if candidate and (Path(candidate) / "train").is_dir() and (Path(candidate) / "val").is_dir():
            return Path(candidate)
    import numpy as np
    from PIL import Image

    folder = out / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 16)):
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
    info["horovodrun"] = shutil.which("horovodrun")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", help="Folder for the runs' files [default: a temporary one, removed]")
    parser.add_argument("--only", help="Run the checks whose names contain this")
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
            for precision, channels_last in PRECISIONS:
                # a CPU emulates fp16 (about 90x slower than fp32 on a 2026 Xeon): named as skipped, not run
                no_fast_path = precision_supported(precision, torch.device(args.device))
                for loader, data in (("device", ARRAY), ("streaming", {**FOLDER, "dataset": "imagefolder"})):
                    name = f"train-{loader}-{precision}{'-channels_last' if channels_last else ''}"
                    if args.only and args.only not in name:
                        continue
                    if no_fast_path:
                        skipped[name] = no_fast_path
                        continue
                    options = {**TRAIN, **data, "precision": precision, "channels_last": channels_last}
                    options["device"] = args.device
                    if loader == "streaming":
                        options["data_dir"] = str(folder)
                    checks[name] = check_training(name, options, out, env)
            multi = report["environment"]
            if multi["horovod.torch"] is True and multi["mpi4py"] is True and multi["horovodrun"]:
                for method in ("ist", "dp"):
                    if not args.only or args.only in f"ranks2-{method}":
                        checks[f"ranks2-{method}"] = check_ranks(method, args.device, out, env)
            else:
                skipped["ranks2-*"] = "Horovod, mpi4py or horovodrun is missing here"
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
