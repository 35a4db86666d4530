"""The accuracy suite: one preset, every method at every process count, into one folder.

Each run is a real `hist-train` (beyond one process under Horovod's mpirun line, or torchrun) writing its usual
timing file into the folder; a run whose file says `completed` is skipped and an interrupted
one resumes, so a suite can be stopped and continued (across sessions, or after a crash).
The resolved settings are written beside the results as `settings.json`; the report (the
published layout) as `report.md`, `report.json` and figures.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..choices import SINGLE
from ..config import Config
from ..errors import HistError
from ..presets import PRESETS, preset_options
from ..world import horovod_importable


@dataclass(frozen=True)
class SuiteRun:
    method: str  # SINGLE for one process
    processes: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-np{self.processes}-seed{self.seed}"


def suite_runs(processes: list[int], methods: list[str], seeds: list[int]) -> list[SuiteRun]:
    """One process trains the full model whatever the method, so it runs once per seed."""
    runs = []
    for n in processes:
        for seed in seeds:
            runs += [SuiteRun(SINGLE, 1, seed)] if n == 1 else [SuiteRun(m, n, seed) for m in methods]
    return runs


def _status(path: Path) -> str | None:
    from ..io.timings import open_h5

    try:
        with open_h5(path) as f:
            return str(f.attrs.get("status"))
    except OSError:
        return None


def command(run: SuiteRun, dataset: str, preset: str, out: Path, extra: list[str], backend: str = "auto") -> list[str]:
    bindir = Path(sys.executable).parent
    method = [] if run.method == SINGLE else ["--method", run.method]
    cmd = [
        str(bindir / "hist-train"),
        dataset,
        "--preset",
        preset,
        *method,
        "--seed",
        str(run.seed),
        "--out",
        str(out),
        *extra,
    ]
    return on_local_ranks(run.processes, cmd, backend)


def on_local_ranks(processes: int, cmd: list[str], backend: str = "horovod") -> list[str]:
    """`cmd` as is for one process, else on as many ranks of this machine: for Horovod the
    mpirun line horovodrun runs (`local_mpirun`), or horovodrun itself; torchrun for the torch
    engine (`auto`: Horovod where it imports)."""
    if processes == 1:
        return cmd
    bindir = Path(sys.executable).parent
    if backend == "torch" or (backend == "auto" and not horovod_importable()):
        return [str(bindir / "torchrun"), "--standalone", "--nproc-per-node", str(processes), "--no-python", *cmd]
    line = local_mpirun(processes)
    if line is None:
        return [str(bindir / "horovodrun"), "-np", str(processes), "-H", f"localhost:{processes}", *cmd]
    return [*line, *cmd]


@functools.lru_cache(maxsize=None)
def _open_mpi() -> str | None:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return None
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return mpirun if "Open MPI" in version else None


def local_mpirun(processes: int) -> list[str] | None:
    """The Open MPI line `horovodrun -np N -H localhost:N` runs (`horovodrun --verbose` prints
    it), started directly: horovodrun first spends about 3 s checking its own build, at every
    launch of every run of a benchmark. Local ranks inherit this environment. None without
    Open MPI (horovodrun then picks the line)."""
    mpirun = _open_mpi()
    if mpirun is None:
        return None
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [mpirun, *root, "--tag-output", "-np", str(processes), "-H", f"localhost:{processes}",
            "-bind-to", "none", "-map-by", "slot", "-mca", "pml", "ob1", "-mca", "btl", "^openib",
            "-mca", "btl_tcp_if_include", "lo", "-x", "NCCL_SOCKET_IFNAME=lo"]  # fmt: skip


def _with_new_defaults(resolved: dict | None) -> dict | None:
    """A folder's settings with the options added to hist-train since at their defaults (a
    folder begun before --backend existed ran what `auto` runs), so it can be continued."""
    if resolved is None:
        return None
    added = {f.name: f.default for f in dataclasses.fields(Config) if f.name not in resolved}
    return {**added, **resolved}


def run_suite(
    dataset: str,
    preset: str,
    folder: Path,
    processes: list[int],
    methods: list[str],
    seeds: list[int],
    extra: list[str],
    resolved: Config,
    log=print,
) -> list[Path]:
    """Run (or continue) every run of the suite; returns the timing files of the whole folder
    (a later call with more process counts or seeds adds to the same comparison)."""
    options = preset_options(preset)
    folder.mkdir(parents=True, exist_ok=True)
    runs = suite_runs(processes, methods, seeds)
    settings = {
        "preset": preset,
        "description": PRESETS[preset][0],
        "preset_options": options,
        "resolved": resolved.as_dict(),
        "dataset": dataset,
        "processes": processes,
        "methods": methods,
        "seeds": seeds,
        "extra_options": extra,
        "commands": {
            r.name: " ".join(command(r, dataset, preset, folder / f"{r.name}.h5", extra, resolved.backend))
            for r in runs
        },
    }
    settings_file = folder / "settings.json"
    if settings_file.exists():  # a folder holds one comparison: same settings, more runs
        try:
            before = json.loads(settings_file.read_text())
        except ValueError:
            raise HistError(f"{settings_file} is not JSON; move it away or use another --out")
        if (_with_new_defaults(before.get("resolved")), before.get("dataset")) != (settings["resolved"], dataset):
            raise HistError(
                f"{folder} holds runs with other settings (see {settings_file}); one folder is "
                f"one comparison: use another --out"
            )
        settings["processes"] = sorted(set(before.get("processes", [])) | set(processes))
        settings["methods"] = sorted(set(before.get("methods", [])) | set(methods))
        settings["seeds"] = sorted(set(before.get("seeds", [])) | set(seeds))
        settings["commands"] = {**before.get("commands", {}), **settings["commands"]}
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for r in runs:
        out = folder / f"{r.name}.h5"
        status = _status(out) if out.exists() else None
        if status == "completed":
            log(f"{r.name}: already completed, kept")
            continue
        cmd = command(r, dataset, preset, out, extra + (["--resume"] if status else []), resolved.backend)
        log(f"{r.name}: {'resuming' if status else 'running'} ({' '.join(cmd)})")
        t = time.time()
        with open(folder / f"{r.name}.log", "a") as logfile:
            code = subprocess.run(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT).returncode
        if code:
            raise HistError(
                f"run {r.name} failed with exit code {code}; see {folder / (r.name + '.log')} "
                f"and run the suite again to resume it"
            )
        log(f"{r.name}: done in {time.time() - t:.0f} s")
    return sorted(folder.glob("*.h5"))
