#!/usr/bin/env python3
"""hist's IST step beside the ResIST release's, on this machine, one run after the other.

The release (dunchen/ResIST_release, `cifar100_local_iteration_test.py`) is read from a
checkout or a bare git directory (`fetch github:dunchen/ResIST_release` gives one) and run
unchanged in its training loop, with these patches, each asserted to apply:
  - CPU and Gloo on 127.0.0.1 (the script's own flags), one thread a process;
  - CIFAR-10 and `--processes` workers (its `specs`), a width multiplier on its channels;
  - torchvision (whose wheels do not import beside torch here) replaced by a loader that does
    what the release's does: per-image random crop (padding 4), flip and normalisation in one
    DataLoader worker a process;
  - its per-round evaluation switched off (`test` and `prepare_whole_model`), and its
    `dispatch_model` and `sync_model` timed.
A step of either side is the time of a round outside its synchronisation, over the round's
steps (data included on both sides): the release's from its loop, hist's
(data_s + compute_s) / steps from its timing file. The first round (warm-up) and the last
(hist's final round sends every block) are left out.

  tools/resist_side_by_side.py --release /work/.mirror/dunchen+ResIST_release/repo \\
      --data-dir ../shared/data/cifar10 --width 0.0625 --local-iters 50 --rounds 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

SCRIPT = "cifar100_local_iteration_test.py"
BIN = Path(sys.executable).parent


def release_file(release: Path, name: str) -> str:
    if (release / name).is_file():
        return (release / name).read_text()
    return subprocess.run(
        ["git", "--git-dir", str(release), "show", f"HEAD:{name}"], check=True, capture_output=True, text=True
    ).stdout


def patched_release(source: str, width: float, processes: int) -> str:
    """The release's script with the patches of this tool's docstring."""
    patches = [
        (
            "class PreActResNet(torch.nn.Module):",
            f"def _w(c):\n    return max(1, int(round(c * {width!r})))\n\n\nclass PreActResNet(torch.nn.Module):",
        ),
        ("self.in_planes = 64", "self.in_planes = _w(64)"),
        ("torch.nn.Conv2d(3, 64, kernel_size=3", "torch.nn.Conv2d(3, _w(64), kernel_size=3"),
        ("self._make_layer(block, 64,", "self._make_layer(block, _w(64),"),
        ("self._make_layer(block, 128,", "self._make_layer(block, _w(128),"),
        ("self._make_layer(block, 256,", "self._make_layer(block, _w(256),"),
        ("self._make_layer(block, 512,", "self._make_layer(block, _w(512),"),
        ("torch.nn.Linear(out_size*block.expansion", "torch.nn.Linear(_w(out_size)*block.expansion"),
        ("'dataset': 'cifar100',", "'dataset': 'cifar10',"),
        ("'world_size': 4,", f"'world_size': {processes},"),
    ]
    for old, new in patches:
        if source.count(old) != 1:
            raise SystemExit(f"the release's {SCRIPT} no longer matches the patch for {old!r}")
        source = source.replace(old, new)
    return source


def cifar_loaders(data_dir: Path):
    """The release's CIFAR-10 loaders without torchvision: the same per-image augmentation."""
    import torch

    from hist.data import read_cifar10

    means = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    stds = torch.tensor((0.2023, 0.1994, 0.2010)).view(3, 1, 1)

    class Cifar(torch.utils.data.Dataset):
        def __init__(self, split, augment):
            self.split, self.augment = split, augment

        def __len__(self):
            return len(self.split.labels)

        def __getitem__(self, i):
            x = torch.from_numpy(self.split.images[i])
            if self.augment:
                x = torch.nn.functional.pad(x, (4, 4, 4, 4))
                dy, dx = torch.randint(0, 9, (2,)).tolist()
                x = x[:, dy : dy + 32, dx : dx + 32]
                if torch.rand(()) < 0.5:
                    x = x.flip(2)
            return (x.float() / 255 - means) / stds, int(self.split.labels[i])

    train = read_cifar10(data_dir / "cifar-10-batches-py", True)
    test = read_cifar10(data_dir / "cifar-10-batches-py", False)
    return (
        torch.utils.data.DataLoader(Cifar(train, True), batch_size=128, shuffle=True, num_workers=1),
        torch.utils.data.DataLoader(Cifar(test, False), batch_size=100, shuffle=False, num_workers=1),
    )


class Enough(Exception):
    pass


def load_release(args) -> dict:
    """The release's script, patched and executed as a module: its namespace."""
    for name in ("torchvision", "torchvision.transforms", "torchvision.datasets", "torchvision.datasets.cifar"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision.datasets.cifar"].CIFAR10 = None
    data = types.ModuleType("data")
    data.get_cifar10_loaders = lambda valid=False: cifar_loaders(Path(args.data_dir))
    data.get_cifar100_loaders = data.get_tin_data = data.get_svhn_loaders = None
    sys.modules["data"] = data
    utils = types.ModuleType("utils")
    exec(compile(release_file(Path(args.release), "utils.py"), "utils.py", "exec"), utils.__dict__)
    sys.modules["utils"] = utils
    ns = {"__name__": "resist_release"}
    source = patched_release(release_file(Path(args.release), SCRIPT), args.width, args.processes)
    exec(compile(source, SCRIPT, "exec"), ns)
    return ns


def release_rank(args) -> None:
    """One rank of the release: run its main() until --rounds syncs, timing each round."""
    import torch

    torch.set_num_threads(1)
    ns = load_release(args)
    spans = []  # (kind, start, end)
    model_cls = ns["ISTResNetModel"]

    def timed(kind, fn):
        def wrapper(self, *a, **k):
            t = time.perf_counter()
            out = fn(self, *a, **k)
            spans.append((kind, t, time.perf_counter()))
            if kind == "sync" and sum(s[0] == "sync" for s in spans) >= args.rounds:
                raise Enough
            return out

        return wrapper

    model_cls.dispatch_model = timed("dispatch", model_cls.dispatch_model)
    model_cls.sync_model = timed("sync", model_cls.sync_model)
    model_cls.ini_sync_dispatch_model = timed("start", model_cls.ini_sync_dispatch_model)
    model_cls.prepare_whole_model = lambda self, specs, a: None  # part of the evaluation
    ns["test"] = lambda *a, **k: None
    sys.argv = [
        SCRIPT,
        f"--rank={args.rank}",
        "--use-cuda=false",
        "--dist-backend=gloo",
        f"--dist-url=tcp://127.0.0.1:{args.port}",
        f"--repartition_iter={args.local_iters}",
        "--lr=0.03",
        "--pytorch-seed=1",
        "--model_name=side-by-side",
    ]
    try:
        ns["main"]()
    except Enough:
        pass
    rounds, begin = [], None
    for kind, start, end in spans:
        if kind in ("start", "dispatch"):
            begin = end
        elif kind == "sync":
            rounds.append({"step_s": (start - begin) / args.local_iters, "sync_s": end - start})
    for r, (kind, start, end) in zip(rounds[1:], [s for s in spans if s[0] == "dispatch"]):
        r["sync_s"] += end - start  # the next round's block redistribution belongs to this round's sync
    Path(args.out).write_text(json.dumps(rounds))


def in_process(args) -> dict:
    """The two steps alone, alternating on the same batches in this process: the release's loop
    body on its model, and hist's TrainStep on hist's, each with the same subnetwork (plan 0's
    first); hist in its default layout and in NCHW. A neighbour's load falls on all alike, so
    the ratios hold on a busy machine, where separate runs' times do not."""
    import torch
    import torch.nn.functional as F

    from hist.comm import connect
    from hist.config import Config
    from hist.engine.clock import PhaseClock
    from hist.engine.precision import Precision, prefers_channels_last
    from hist.engine.step import one_round_step
    from hist.models import build_model, make_plan

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ns = load_release(args)
    blocks = make_plan(0, 0, 22, args.processes).blocks[0]
    release = ns["PreActResNet101"](out_size=512, num_classes=10)
    for i in range(1, 23):  # the release numbers layer3's blocks from 1; hist's partition from layer3[1]
        release.layer3[i].active_flag = (i - 1) in blocks
    release_opt = torch.optim.SGD(release.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def release_step():  # the release's loop body
        release_opt.zero_grad()
        output = release(x)
        loss = F.cross_entropy(output, y)
        loss.backward()
        release_opt.step()
        output.max(1, keepdim=True)[1].eq(y.view(-1, 1)).sum().item()

    def hist_step(layout):
        cfg = Config(width=args.width, lr=0.03, momentum=0.9, weight_decay=5e-4, optimizer_state="restart")
        model = build_model(cfg.arch, 10, args.width).to(memory_format=layout)
        step = one_round_step(cfg, model, connect(1, 1), cfg.lr, Precision("fp32", x.device), PhaseClock(x.device))
        model.set_subnetwork(blocks)
        step.set_lr(cfg.lr)
        step.clock.start()
        xl = x.contiguous(memory_format=layout)
        return lambda: step(xl, y)

    default = torch.channels_last if prefers_channels_last(x.device) else torch.contiguous_format
    steps = {"release": release_step, "hist": hist_step(default), "hist-nchw": hist_step(torch.contiguous_format)}
    times = {k: [] for k in steps}
    for i in range(1 + args.pairs):
        order = list(steps)[i % 3 :] + list(steps)[: i % 3]
        for name in order:
            t = time.perf_counter()
            steps[name]()
            if i:  # the first pass warms up
                times[name].append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in times.items()}
    for side in ("hist", "hist-nchw"):
        out[f"{side}_over_release"] = statistics.median(a / b for a, b in zip(times[side], times["release"]))
    out["settings"] = {"width": args.width, "pairs": args.pairs, "subnetwork_blocks": len(blocks)}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_release(args, tmp: Path) -> dict:
    port = free_port()
    logs = [open(tmp / f"r{r}.log", "w") for r in range(args.processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--release-rank", str(r), "--port", str(port), "--out", str(tmp / f"r{r}.json"),
             "--release", args.release, "--data-dir", args.data_dir, "--width", str(args.width),
             "--local-iters", str(args.local_iters), "--rounds", str(args.rounds), "--processes", str(args.processes)],
            cwd=tmp, stdout=logs[r], stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        for r in range(args.processes)
    ]  # fmt: skip
    failed = [r for r, p in enumerate(procs) if p.wait()]
    if failed:
        raise SystemExit(f"release rank {failed[0]} failed:\n" + (tmp / f"r{failed[0]}.log").read_text()[-3000:])
    rounds = [json.loads((tmp / f"r{r}.json").read_text()) for r in range(args.processes)]
    steady = slice(1, args.rounds - 1)
    return {
        "step_s": statistics.mean(max(rk[i]["step_s"] for rk in rounds) for i in range(args.rounds)[steady]),
        "sync_s": statistics.mean(max(rk[i]["sync_s"] for rk in rounds) for i in range(args.rounds)[steady]),
    }


def run_hist(args, tmp: Path, layout: list[str] = ()) -> dict:
    from hist.io.timings import read_run

    out = tmp / "hist.h5"
    # One round more than measured, stopped after --rounds: the run then ends at a checkpoint,
    # not at its final evaluation (10,000 test images at full width cost minutes on a CPU).
    epochs = (args.rounds + 1) * args.local_iters / (50_000 // 128)
    cmd = [
        str(BIN / "horovodrun"), "-np", str(args.processes), "-H", f"localhost:{args.processes}",
        str(BIN / "hist-train"), "cifar10", "--data-dir", args.data_dir, "--method", "ist", "--data-split", "full",
        "--arch", "preact_resnet101", "--width", str(args.width), "--batch-size", "128", "--lr", "0.03",
        "--lr-scaling", "none", "--warmup-epochs", "0", "--momentum", "0.9", "--weight-decay", "5e-4",
        "--optimizer-state", "restart", "--local-iters", str(args.local_iters), "--epochs", f"{epochs:.6f}",
        "--threads", "1", "--bn-batches", "1", "--stop-after-rounds", str(args.rounds), "--out", str(out), *layout,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 3:  # hist-train's exit status after a requested stop, checkpoint written
        raise SystemExit(f"hist-train exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    r = read_run(out).rounds
    steps = r["steps"][:, None] if r["steps"].ndim == 1 else r["steps"]
    per_step = ((r["data_s"] + r["compute_s"]) / steps).max(axis=1)
    steady = slice(1, len(per_step) - 1)
    data = (r["data_s"] / steps).max(axis=1)
    return {
        "step_s": float(per_step[steady].mean()),
        "data_s": float(data[steady].mean()),
        "sync_s": float(r["sync_s"].max(axis=1)[steady].mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--release", required=True, help="the release's checkout or git directory")
    p.add_argument("--data-dir", required=True, help="the folder holding cifar-10-batches-py")
    p.add_argument("--width", type=float, default=0.0625)
    p.add_argument("--local-iters", type=int, default=50)
    p.add_argument("--rounds", type=int, default=4, help="rounds per run; the first and last are left out")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sides", default="release,hist,hist-nchw", help="which of release, hist, hist-nchw to run")
    p.add_argument("--in-process", action="store_true", help="time the two steps alone, alternating in one process")
    p.add_argument("--pairs", type=int, default=6, help="with --in-process: rounds of the three steps timed")
    p.add_argument("--release-rank", dest="rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data_dir, args.release = str(Path(args.data_dir).resolve()), str(Path(args.release).resolve())
    if args.rank is not None:
        release_rank(args)
        return
    if args.in_process:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        print(json.dumps(in_process(args)))
        return
    runs = []
    sides = {
        "release": run_release,
        "hist": run_hist,  # hist-train's defaults: NHWC on a CPU
        "hist-nchw": lambda a, tmp: run_hist(a, tmp, ["--no-channels-last"]),  # the release's layout
    }
    sides = {name: sides[name] for name in args.sides.split(",")}
    for i in range(args.repeats):  # one after the other, in turn, each side first in turn
        for side in list(sides)[i % len(sides) :] + list(sides)[: i % len(sides)]:
            with tempfile.TemporaryDirectory() as tmp:
                fig = sides[side](args, Path(tmp))
            runs.append({"side": side, **fig})
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for side in sides:
        summary[side] = {k: [r[k] for r in runs if r["side"] == side] for k in ("step_s", "sync_s")}
    for side in sorted({"hist", "hist-nchw"} & set(sides) if "release" in sides else ()):
        summary[f"{side}_over_release"] = statistics.median(summary[side]["step_s"]) / statistics.median(
            summary["release"]["step_s"]
        )
    summary["settings"] = {k: getattr(args, k) for k in ("width", "local_iters", "rounds", "processes", "repeats")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
