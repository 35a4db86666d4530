"""`make demo` at several seeds and torch kernel levels, one after another, then the margins table.

    python tools/demo_margins.py --seeds 0,1,2,3,4 --levels default,avx2,avx512 --out runs/margins

Each (level, seed) runs `make demo DEMO_DIR=OUT/LEVEL-seedN DEMO_SEED=N` with
ATEN_CPU_CAPABILITY=LEVEL (torch's CPU kernels at that level, so one machine rounds as other
processors do); a folder that already holds its report is kept, so the command resumes. Then
one Markdown row per (level, seed): the target (one process's final accuracy minus 1 point),
each run's final accuracy against it and against the run's own peak, the epoch and time at which
it first reached it, IST's speed per epoch against one process (with and without the
evaluations), and the machine's load average before and after. Run it with the machine to itself: the times are the point (the epochs are not
moved by load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hist.analysis.report import load_runs, summarise  # noqa: E402

FILES = ("single-np1.h5", "ist-full-np2.h5", "ist-shard-np2.h5")


def run_demo(folder: Path, seed: int, level: str) -> None:
    if (folder / "report.txt").is_file():
        return
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
    cmd = ["make", "-C", str(ROOT), "demo", f"DEMO_DIR={folder}", f"DEMO_SEED={seed}"]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    (folder / "make.log").write_text(proc.stdout + proc.stderr)
    (folder / "loadavg.txt").write_text(f"before {' '.join(load_before)}\nafter {' '.join(load_after)}\n")
    if proc.returncode != 0:
        sys.exit(f"demo_margins: {' '.join(cmd)} failed (exit {proc.returncode}); see {folder / 'make.log'}")
    (folder / "report.txt").write_text(proc.stdout)


def epoch_at(run, target: float) -> float | None:
    """The epoch of the first evaluation at or above `target` (the machine's load cannot move it)."""
    for epoch, acc in zip(run.evals["epoch"], run.evals["test_accuracy"]):
        if acc >= target:
            return float(epoch)
    return None


def row(folder: Path, level: str, seed: int) -> str:
    runs = {Path(str(r.path)).name: r for r in load_runs([folder / f for f in FILES])}
    rows, _ = summarise(list(runs.values()))
    by = {(r["method"], r["data_split"]): r for r in rows}
    single, full, shard = by[("single", "both")], by[("ist", "full")], by[("ist", "shard")]
    target = single["target_accuracy"]
    kernels = {json.loads(r.attrs.get("versions", "{}")).get("cpu_capability") for r in runs.values()}

    def cell(r, name):
        run = runs[name]
        peak = float(max(run.evals["test_accuracy"]))
        t, tb, e = r["time_to_target_s"], single["time_to_target_s"], epoch_at(run, target)
        reach = (
            "never"
            if t is None
            else f"epoch {e:g}, {t:.1f} s" + (f" ({tb / t:.2f}x)" if tb and r is not single else "")
        )
        fall = r["final_accuracy"] - peak
        return f"{r['final_accuracy']:.2f}% ({r['final_accuracy'] - target:+.2f}; {fall:+.2f} from peak), {reach}"

    return (
        f"| {level} ({'/'.join(sorted(k for k in kernels if k))}) | {seed} | {target:.2f}% "
        f"| {cell(single, FILES[0])} | {cell(full, FILES[1])} | {cell(shard, FILES[2])} "
        f"| {full['speedup']:.2f}x ({full['train_speedup']:.2f}x), {shard['speedup']:.2f}x ({shard['train_speedup']:.2f}x) "
        f"| {load(folder)} |"
    )


def load(folder: Path) -> str:
    """The machine's 1-minute load average before and after the demo (2 cores: above 2, others ran)."""
    path = folder / "loadavg.txt"
    if not path.is_file():
        return "-"
    values = [line.split()[1] for line in path.read_text().splitlines()]
    return " / ".join(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--levels", default="default,avx2,avx512")
    ap.add_argument("--out", type=Path, default=Path("runs/margins"))
    ap.add_argument("--table-only", action="store_true", help="Only print the table of the folders there.")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    levels = [lv.strip() for lv in a.levels.split(",")]
    out = a.out.resolve()
    if not a.table_only:
        for level in levels:
            for seed in seeds:
                folder = out / f"{level}-seed{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                run_demo(folder, seed, level)
                print(f"done {folder}", file=sys.stderr, flush=True)
    print(
        "| kernel level (torch's) | seed | target | one process: final (vs target; vs its peak), target at "
        "| IST `full`: the same (x sooner than one process) | IST `shard`: the same "
        "| per epoch vs one process (training alone): `full`, `shard` | load before / after |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for level in levels:
        for seed in seeds:
            folder = out / f"{level}-seed{seed}"
            if all((folder / f).is_file() for f in FILES):
                print(row(folder, level, seed))


if __name__ == "__main__":
    main()
