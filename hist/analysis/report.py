"""hist-report: speedup, time to accuracy, round breakdown and communication from timing files.

Runs are grouped by (dataset, arch, width, method, data split, world size) and by any training
option that tells runs of such a group apart (`--round-schedule qsr`: unlike runs never average
into one row; seeds do); each group becomes one table row and one point on the figures. A one-process run is the same under both data
splits (`--data-split`), so it is labelled `both` and is the baseline of either. The baseline is the one-process run of the same dataset,
arch and width; without one, speedups are relative to the smallest world size present and
the table says so.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..choices import METHODS, SINGLE
from ..config import bookkeeping_keys
from ..errors import HistError
from ..io.timings import SCHEMA, Run, isolated, open_h5, read_checked
from . import noise as noise_scale

COLUMNS = (
    "dataset",
    "arch",
    "method",
    "data_split",
    "world_size",
    "variant",
    "runs",
    "epochs",
    "seconds_per_epoch",
    "train_seconds_per_epoch",
    "wall_s",
    "speedup",
    "train_speedup",
    "speedup_vs_local_sgd",
    "time_to_target_s",
    "time_to_lower_target_s",
    "epoch_at_target",
    "speedup_to_target",
    "final_accuracy",
    "final_accuracy_std",
    "gap_to_single",
    "gap_to_single_se",
    "gap_to_single_seeds",
    "final_top5",
    "target_accuracy",
    "compute_s_per_round",
    "data_s_per_round",
    "sync_s_per_round",
    "bytes_per_round",
    "baseline",
)


def load_runs(paths, skip_damaged=None) -> list[Run]:
    """Every run in the files and folders given. With `skip_damaged` (a function taking one
    line), a damaged or foreign file is reported there and left out, and the others are read;
    without it, the first bad file raises."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("**/*.h5"))
            if not found:
                raise HistError(f"folder {p} holds no .h5 timing files; pass files hist-train wrote")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise HistError(f"{p} does not exist; pass a timing file or a folder of them")
    runs, bad = [], []
    for f in files:
        try:
            runs += isolated(_read_file, f)
        except HistError as e:
            if skip_damaged is None:
                raise
            bad.append(e)
    if not runs and len(bad) == 1:
        raise bad[0]
    for e in bad:
        skip_damaged(f"skipped: {e}")
    if not runs:
        raise HistError(f"none of the {len(files)} file(s) could be read; pass files hist-train wrote")
    return runs


def _read_file(path: Path) -> list[Run]:
    """The runs of one file: a merged file holds several."""
    return _read_merged(path) if _is_merged(path) else [read_checked(path)]


def _is_merged(path: Path) -> bool:
    try:
        with open_h5(path) as f:
            return f.attrs.get("schema") == SCHEMA + "-merged"
    except Exception:
        return False


def _read_merged(path: Path) -> list[Run]:
    import tempfile

    runs = []
    with open_h5(path) as f, tempfile.TemporaryDirectory() as tmp:
        for name in f["runs"]:
            part = Path(tmp) / f"{name}.h5"
            with open_h5(part, "w") as out:
                for k, v in f["runs"][name].attrs.items():
                    out.attrs[k] = v
                for g in ("rounds", "evals", "noise"):
                    if g in f["runs"][name]:
                        f.copy(f["runs"][name][g], out, g)
            run = read_checked(part)
            run.path = Path(f"{path}:{name}")
            runs.append(run)
    return runs


def merge(runs: list[Run], dest: Path) -> None:
    """Copy every run into one file, one group per run under /runs."""
    with open_h5(dest, "w") as out:
        out.attrs["schema"] = SCHEMA + "-merged"
        base = out.create_group("runs")
        for i, run in enumerate(runs):
            g = base.create_group(f"{i:03d}-{Path(str(run.path)).stem}")
            for k, v in run.attrs.items():
                g.attrs[k] = v
            for name, cols in (("rounds", run.rounds), ("evals", run.evals), ("noise", run.noise)):
                if name == "noise" and not cols:
                    continue
                sub = g.create_group(name)
                for k, v in cols.items():
                    sub.create_dataset(k, data=v, maxshape=(None,) + v.shape[1:], chunks=True)


# A one-process run's data split: it passes the whole set each epoch under either.
BOTH_SPLITS = "both"
# The second time-to-accuracy column stands this many points below the target.
LOWER_TARGET_POINTS = 2.0


def split_label(run: Run) -> str:
    return BOTH_SPLITS if int(run.attrs["world_size"]) == 1 else run.data_split


def _base_key(run: Run) -> tuple:
    a = run.attrs
    return (a["dataset"], a["arch"], float(a.get("width", 1.0)), a["method"], split_label(run), int(a["world_size"]))


# Runs that differ only in where their files live or how they are watched (or in the seed,
# which a row averages over) share a row.
BOOKKEEPING_OPTIONS = bookkeeping_keys()


def variants(runs: list[Run]) -> dict[int, str]:
    """Per run (by id): the options, as flags, in which it differs from other runs of its
    group (`--round-schedule qsr`), so a comparison of schedules is not averaged into one row.
    Options that some file of the group predates are left out of the comparison."""
    groups = defaultdict(list)
    for run in runs:
        groups[_base_key(run)].append(run)
    labels = {}
    for group in groups.values():
        common = set.intersection(*(set(r.config) for r in group)) - BOOKKEEPING_OPTIONS
        value = lambda r, k: json.dumps(r.config[k], sort_keys=True, default=str)
        differ = sorted(k for k in common if len({value(r, k) for r in group}) > 1)
        for r in group:
            labels[id(r)] = " ".join(f"--{k.replace('_', '-')} {r.config[k]}" for k in differ)
    return labels


def method_label(row: dict) -> str:
    """The method with its protocol where there is one to say, and its variant where the report
    holds others of its kind: `ist (full)`, `ist (shard) --round-schedule qsr`."""
    label = row["method"] if row["data_split"] == BOTH_SPLITS else f"{row['method']} ({row['data_split']})"
    return f"{label} {row['variant']}" if row.get("variant") else label


def time_to(run: Run, target: float | None) -> float | None:
    """Wall seconds at the first evaluation at or above `target`; None if never."""
    e = run.evals
    reached = [float(w) for w, acc in zip(e["wall_s"], e["test_accuracy"]) if target is not None and acc >= target]
    return reached[0] if reached else None


def epoch_at(run: Run, target: float | None) -> float | None:
    """The epoch of the first evaluation at or above `target` (a machine's load cannot move it); None if never."""
    e = run.evals
    reached = [float(x) for x, acc in zip(e["epoch"], e["test_accuracy"]) if target is not None and acc >= target]
    return reached[0] if reached else None


def epochs_done(run: Run) -> float:
    """Epochs the run trained, to a tenth (the last round's epoch)."""
    return round(float(run.rounds["epoch"][-1]), 1) if len(run.rounds["epoch"]) else 0.0


def longest(runs: list[Run]) -> tuple[list[Run], list[Run], float]:
    """(the runs that trained as many epochs as the longest, those stopped short, those
    epochs): a stopped run averaged in would pull a mean over seeds toward an earlier epoch."""
    last = max((epochs_done(r) for r in runs), default=0.0)
    return [r for r in runs if epochs_done(r) == last], [r for r in runs if epochs_done(r) < last], last


def evaluation_seconds(run: Run) -> float:
    """Seconds of the run's wall time spent evaluating: each evaluation ends at its `evals/wall_s`
    and starts at its round's `rounds/wall_s`; the one after the last round lies outside the wall."""
    r, e = run.rounds, run.evals
    if not len(r["wall_s"]):
        return 0.0
    ends = {int(k): float(w) for k, w in zip(r["round"], r["wall_s"])}
    last = int(r["round"][-1])
    return float(sum(w - ends[int(k)] for k, w in zip(e["round"], e["wall_s"]) if int(k) in ends and int(k) != last))


def _run_figures(run: Run, target: float | None) -> dict:
    r, e = run.rounds, run.evals
    epochs = float(r["epoch"][-1]) if len(r["epoch"]) else 0.0
    wall = float(r["wall_s"][-1]) if len(r["wall_s"]) else 0.0
    return {
        "epochs": epochs,
        "seconds_per_epoch": wall / epochs if epochs else float("nan"),
        # the same without the evaluations: what the method itself takes an epoch
        "train_seconds_per_epoch": (wall - evaluation_seconds(run)) / epochs if epochs else float("nan"),
        "wall_s": wall,
        "time_to_target_s": time_to(run, target),
        "epoch_at_target": epoch_at(run, target),
        "time_to_lower_target_s": time_to(run, None if target is None else target - LOWER_TARGET_POINTS),
        "final_accuracy": float(e["test_accuracy"][-1]) if len(e["test_accuracy"]) else None,
        # files written before top-5 was recorded read it as NaN
        "final_top5": float(e["test_top5"][-1]) if len(e["test_top5"]) and np.isfinite(e["test_top5"][-1]) else None,
        "compute_s_per_round": float(r["compute_s"].mean()) if len(r["compute_s"]) else 0.0,
        "data_s_per_round": float(r["data_s"].mean()) if len(r["data_s"]) else 0.0,
        "sync_s_per_round": float(r["sync_s"].mean()) if len(r["sync_s"]) else 0.0,
        "bytes_per_round": float(r["bytes_sent"].sum(axis=1).mean()) if len(r["bytes_sent"]) else 0.0,
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(runs: list[Run], target_accuracy: float | None = None) -> tuple[list[dict], list[str]]:
    """One row per group, speedups against the one-process (or smallest) run of the same model."""
    if not runs:
        raise HistError("no runs to report")
    notes = [protocol_note(runs)]
    if processors := processor_note(runs):
        notes.append(processors)
    engines = Counter(run.engine for run in runs if int(run.attrs["world_size"]) > 1)
    if engines:  # which engine moved the bytes: Horovod + MPI, or torch.distributed
        notes.append("engine: " + "; ".join(f"{e} ({n} run{'s' * (n > 1)})" for e, n in sorted(engines.items())))
    traffic = Counter(f"{run.attrs['method']}: {run.traffic}" for run in runs if run.traffic)
    for what, n in sorted(traffic.items()):  # the precision of each kind of traffic
        notes.append(f"traffic, {what} ({n} run{'s' * (n > 1)})")
    if target_accuracy is None:
        target_accuracy, why = default_target(runs)
        if target_accuracy is not None:
            notes.append(f"time to target: target accuracy {target_accuracy:.2f}% ({why})")
    variant, grouped = variants(runs), defaultdict(list)
    for run in runs:
        grouped[(*_base_key(run), variant[id(run)])].append(run)
    groups, finals_by_seed, short = {}, defaultdict(dict), []
    for key, members in grouped.items():
        kept, stopped, last = longest(members)
        short += [(run, last) for run in stopped]
        groups[key] = [_run_figures(run, target_accuracy) for run in kept]
        for run, figs in zip(kept, groups[key]):
            if figs["final_accuracy"] is not None:
                finals_by_seed[key][run.config.get("seed")] = (round(figs["epochs"], 1), figs["final_accuracy"])
    if short:
        listed = ", ".join(f"{run.path.name} (epoch {epochs_done(run):.1f} of {last:.1f})" for run, last in short)
        notes.append(f"left out of the means, stopped short of their group's epochs: {listed}; resume with --resume")
    rows, seed_finals = [], {}  # seed_finals: each row's final accuracy by seed
    for key, figs in sorted(groups.items()):
        dataset, arch, width, method, split, world, flags = key
        row = {
            "dataset": dataset,
            "arch": arch,
            "width": width,
            "method": method,
            "data_split": split,
            "world_size": world,
            "variant": flags,
            "runs": len(figs),
        }
        for name in figs[0]:
            row[name] = _mean([f[name] for f in figs])
        finals = [f["final_accuracy"] for f in figs if f["final_accuracy"] is not None]
        row["final_accuracy_std"] = float(np.std(finals, ddof=1)) if len(finals) > 1 else None
        row["target_accuracy"] = target_accuracy
        rows.append(row)
        seed_finals[id(row)] = finals_by_seed[key]
    for row in rows:
        model = [
            x for x in rows if (x["dataset"], x["arch"], x["width"]) == (row["dataset"], row["arch"], row["width"])
        ]
        singles = [x for x in model if x["world_size"] == 1]
        if singles:
            base, row["baseline"] = singles[0], "1 process"
        else:
            same = [
                x
                for x in model
                if (x["method"], x["data_split"], x["variant"]) == (row["method"], row["data_split"], row["variant"])
            ]
            base = min(same, key=lambda x: x["world_size"])
            row["baseline"] = f"{base['world_size']} processes (no 1-process run)"
            note = (
                f"{row['dataset']}/{row['arch']}/{row['method']}: no one-process run; speedup relative "
                f"to {base['world_size']} processes"
            )
            if note not in notes:
                notes.append(note)
        row.update(paired_gap(seed_finals[id(row)], seed_finals[id(base)] if singles and base is not row else {}))
        row["speedup"] = base["seconds_per_epoch"] / row["seconds_per_epoch"]
        row["train_speedup"] = base["train_seconds_per_epoch"] / row["train_seconds_per_epoch"]
        tb, tr = base["time_to_target_s"], row["time_to_target_s"]
        row["speedup_to_target"] = tb / tr if tb and tr else None
        local = sorted(
            (
                x
                for x in model
                if x["method"] == "local-sgd"
                and (x["world_size"], x["data_split"]) == (row["world_size"], row["data_split"])
            ),
            key=lambda x: x["variant"] != row["variant"],  # its own variant's local SGD first
        )
        row["speedup_vs_local_sgd"] = (
            local[0]["seconds_per_epoch"] / row["seconds_per_epoch"]
            if local and row["world_size"] > 1 and row["method"] != "local-sgd"
            else None
        )
    return rows, notes


def paired_gap(finals: dict, single_finals: dict) -> dict:
    """Final accuracy minus the one-process run's of the same seed, over the seeds both ran to
    the same epoch ((epochs, accuracy) by seed; a stopped run pairs with nothing): a seed fixes
    the initial model, so the pairs cancel part of the seed-to-seed spread that a target of a
    point or two sits inside. Mean, its standard error (two seeds or more), count."""
    both = sorted((s for s in set(finals) & set(single_finals) if finals[s][0] == single_finals[s][0]), key=str)
    gaps = [finals[s][1] - single_finals[s][1] for s in both]
    if not gaps:
        return {"gap_to_single": None, "gap_to_single_se": None, "gap_to_single_seeds": 0}
    se = float(np.std(gaps, ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else None
    return {"gap_to_single": float(np.mean(gaps)), "gap_to_single_se": se, "gap_to_single_seeds": len(gaps)}


def protocol_note(runs: list[Run]) -> str:
    """Which data split (`--data-split`) the multi-process runs used: every table says it."""
    splits = sorted({r.data_split for r in runs if int(r.attrs["world_size"]) > 1})
    what = {
        "shard": "shard (each epoch cut into per-process shards: N processes take 1/N of the steps per epoch)",
        "full": "full (every process passes the whole training set each epoch: equal steps per process)",
    }
    if not splits:
        return "data split: one process only (the same under shard and full)"
    return "data split: " + "; ".join(what.get(s, s) for s in splits)


def processor_note(runs: list[Run]) -> str | None:
    """Runs from different processors round differently, and one seed of a short run turns that
    into points of accuracy (docs/accuracy.md): a table that mixes them says so."""
    counts = defaultdict(int)
    for run in runs:
        if (name := run.processor) is not None:
            counts[name] += 1
    if len(counts) < 2:
        return None
    return (
        "processors differ: "
        + "; ".join(f"{name} ({n} run{'s' * (n > 1)})" for name, n in sorted(counts.items()))
        + ": the same seed rounds differently on each, which moves short runs by points; compare within one"
    )


def default_target(runs: list[Run]) -> tuple[float | None, str]:
    """The single process's final accuracy minus one point (the claim: the accuracy of one GPU,
    sooner); without a one-process run, 90% of the best final accuracy."""

    def finals(rs):
        return [float(r.evals["test_accuracy"][-1]) for r in rs if len(r.evals["test_accuracy"])]

    singles = finals(longest([r for r in runs if int(r.attrs["world_size"]) == 1])[0])
    if singles:
        return float(np.mean(singles)) - 1.0, "the one-process run's final accuracy minus 1 point"
    best = finals(runs)
    return (0.9 * max(best), "90% of the best final accuracy") if best else (None, "")


def format_paper_table(rows: list[dict], notes: list[str], oversubscribed_above: int | None = None) -> str:
    """The published layout in Markdown: a row per method, a column per process count; each cell
    holds accuracy (mean ± spread over seeds), wall time, bytes per round, speedup over one
    process and over local SGD, and time to the target accuracy."""
    worlds = sorted({r["world_size"] for r in rows})
    order = [SINGLE, *METHODS]
    labels = {method_label(r): order.index(r["method"]) if r["method"] in order else 9 for r in rows}
    methods = sorted(labels, key=lambda m: (labels[m], m))
    cell = {(method_label(r), r["world_size"]): r for r in rows}

    def fmt(r: dict) -> str:
        acc = "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.2f}%"
        if r["final_accuracy_std"] is not None:
            acc += f" ± {r['final_accuracy_std']:.2f} (n={r['runs']})"
        if r["final_top5"] is not None:
            acc += f" (top-5 {r['final_top5']:.2f}%)"
        if r.get("gap_to_single_seeds", 0) > 1:
            acc += f"<br>{r['gap_to_single']:+.2f} ± {r['gap_to_single_se']:.2f} vs single, seed by seed (n={r['gap_to_single_seeds']})"
        parts = [acc, f"{r['wall_s']:.0f} s", f"{r['bytes_per_round'] / 1e6:.2f} MB/round"]
        if r["world_size"] > 1:
            vs_local = "" if r["speedup_vs_local_sgd"] is None else f", {r['speedup_vs_local_sgd']:.2f}x local SGD"
            parts.append(f"{r['speedup']:.2f}x single{vs_local}")
        at = lambda t: "not reached" if t is None else f"at {t:.0f} s"
        parts.append(f"target {at(r['time_to_target_s'])}")
        if r["target_accuracy"] is not None:
            parts.append(f"target - {LOWER_TARGET_POINTS:g} {at(r['time_to_lower_target_s'])}")
        if oversubscribed_above and r["world_size"] > oversubscribed_above:
            parts.append("oversubscribed: time not meaningful")
        return "<br>".join(parts)

    head = "| method | " + " | ".join(f"{w} process{'es' if w > 1 else ''}" for w in worlds) + " |"
    lines = [head, "|" + " --- |" * (len(worlds) + 1)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(fmt(cell[(m, w)]) if (m, w) in cell else "" for w in worlds) + " |")
    return "\n".join(lines + [""] + [f"note: {n}" for n in notes])


def format_epoch_table(runs: list[Run], notes: list[str]) -> str:
    """Test accuracy of each run at each evaluation, a column per epoch (to 0.1): the curves of
    the figure as numbers, in Markdown."""
    columns = sorted({round(float(e), 1) for r in runs for e in r.evals["epoch"]})
    head = "| run | " + " | ".join(f"{c:g}" for c in columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 1)]
    variant = variants(runs)
    order = lambda r: (int(r.attrs["world_size"]), r.attrs["method"], split_label(r), variant[id(r)])
    for run in sorted(runs, key=order):
        world = int(run.attrs["world_size"])
        label = method_label(
            {"method": run.attrs["method"], "data_split": split_label(run), "variant": variant[id(run)]}
        )
        seed = run.config.get("seed")
        at = {round(float(e), 1): float(a) for e, a in zip(run.evals["epoch"], run.evals["test_accuracy"])}
        cells = [f"{at[c]:.2f}" if c in at else "" for c in columns]
        lines.append(f"| {label} np{world}{f' seed {seed}' if seed else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"note: {n}" for n in notes])


def format_table(rows: list[dict], notes: list[str]) -> str:
    head = (
        "dataset",
        "arch",
        "method",
        "split",
        "np",
        "epochs",
        "s/epoch",
        "speedup",
        "train x",
        "to-target s",
        f"to-target-{LOWER_TARGET_POINTS:g} s",
        "speedup@tgt",
        "acc %",
        "vs 1p",
        "top-5 %",
        "compute s",
        "data s",
        "sync s",
        "MB/round",
    )
    lines = [head]
    fmt = lambda v, p=2: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{p}f}"
    for r in rows:
        lines.append(
            (
                r["dataset"],
                r["arch"].removeprefix("preact_"),
                r["method"],
                r["data_split"],
                str(r["world_size"]),
                fmt(r["epochs"]),
                fmt(r["seconds_per_epoch"]),
                fmt(r["speedup"]),
                fmt(r["train_speedup"]),
                fmt(r["time_to_target_s"], 1),
                fmt(r["time_to_lower_target_s"], 1),
                fmt(r["speedup_to_target"]),
                fmt(r["final_accuracy"]),
                "-" if r["gap_to_single"] is None else f"{r['gap_to_single']:+.2f}",
                fmt(r["final_top5"]),
                fmt(r["compute_s_per_round"], 3),
                fmt(r["data_s_per_round"], 3),
                fmt(r["sync_s_per_round"], 3),
                fmt(r["bytes_per_round"] / 1e6, 3),
            )
        )
    if any(r["variant"] for r in rows):  # the options that tell runs of one kind apart, last
        lines = [lines[0] + ("variant",)] + [line + (r["variant"] or "-",) for line, r in zip(lines[1:], rows)]
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines)
    return text + "".join(f"\nnote: {n}" for n in notes)


def format_claim(rows: list[dict]) -> str:
    """The claim in plain words, for each IST row beside a one-process run of its model: its
    epoch against one process's (and against linear under `shard`), its final accuracy after the
    same epochs, and when it first reached the target against one process. Empty without a
    one-process run or an IST row."""
    lines = []
    times = lambda x: f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"
    for row in rows:
        singles = [
            x
            for x in rows
            if x["world_size"] == 1
            and (x["dataset"], x["arch"], x["width"]) == (row["dataset"], row["arch"], row["width"])
        ]
        if row["method"] != "ist" or row["world_size"] == 1 or not singles or row["final_accuracy"] is None:
            continue
        base, n, target, split = singles[0], row["world_size"], row["target_accuracy"], row["data_split"]
        gap = row["final_accuracy"] - base["final_accuracy"]
        speed, train = row["speedup"], row["train_speedup"]
        how = (
            f"each of {n} processes passes the whole set every epoch: one process's steps"
            if split == "full"
            else f"the {n} processes share each epoch: 1/{n} of one process's steps each"
        )
        linear = ""
        if split != "full":
            linear = (
                f", {'more than' if train > n else 'less than' if train < n else 'exactly'} the {n}x of {n} processes"
            )
        cost = ""
        if split != "full":
            cost = (
                f": at equal epochs, 1/{n} of the steps cost {-gap:.2f} points"
                if gap < 0
                else f": at equal epochs, 1/{n} of the steps cost nothing here"
            )
        line = (
            f"IST, --data-split {split} ({how}, each on its own subnetwork): an epoch took "
            f"{row['seconds_per_epoch']:.2f} s against one process's {base['seconds_per_epoch']:.2f} s ({times(speed)}; "
            f"its training alone {times(train)}{linear}). After the same {row['epochs']:g} epochs, in "
            f"{row['wall_s']:.1f} s against {base['wall_s']:.1f} s, it ended at {row['final_accuracy']:.2f}% against "
            f"one process's {base['final_accuracy']:.2f}% ({gap:+.2f} points{cost})."
        )
        at = lambda r: (
            "never"
            if r["time_to_target_s"] is None
            else f"at epoch {r['epoch_at_target']:g} ({r['time_to_target_s']:.1f} s)"
        )
        if target is not None and row["time_to_target_s"] is None:
            line += f" It never reached the target {target:.2f}%; one process reached it {at(base)}."
        elif target is not None:
            line += f" It first reached the target {target:.2f}% {at(row)}, one process {at(base)}."
        lines.append(line)
    return "\n".join(lines)


def noise_summaries(runs: list[Run]) -> list[tuple[Run, dict]]:
    """Each run with gradient-noise-scale probes (--noise-every), with what they say."""
    out = []
    for run in runs:
        s = noise_scale.summary(run, int(run.config.get("batch_size", 128)))
        if s is not None:
            out.append((run, s))
    return out


def format_noise(runs: list[Run]) -> str:
    return "\n".join(noise_scale.format_summary(Path(str(run.path)).name, s) for run, s in noise_summaries(runs))


def draw_figures(runs: list[Run], rows: list[dict], out: Path) -> list[Path]:
    """Speedup, accuracy-vs-time, round breakdown and bytes per round, as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            written.append(path)
        plt.close(fig)

    methods = sorted({method_label(r) for r in rows if r["world_size"] > 1}) or sorted({r["method"] for r in rows})
    worlds = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, field, title in (
        (axes[0], "speedup", "wall time per epoch"),
        (axes[1], "speedup_to_target", "time to target accuracy"),
    ):
        for m in methods:
            pts = sorted(
                (r["world_size"], r[field])
                for r in rows
                if (method_label(r) == m or r["world_size"] == 1) and r[field] is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.plot(worlds, [w / worlds[0] for w in worlds], "k--", label="linear")
        ax.set(xlabel="GPUs (processes)", ylabel="speedup", title=f"Speedup: {title}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.legend()
    save(fig, "speedup")

    # Accuracy against wall time (who gets there sooner) and against epochs (what the same
    # data buys), with the target: the claim under either protocol in one figure.
    fig, (ax, ax_epochs) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    variant = variants(runs)
    for run in runs:
        if len(run.evals["wall_s"]):
            seed = run.config.get("seed")
            label = (
                f"{run.attrs['method']} np{run.attrs['world_size']}"
                + (f" {run.data_split}" if int(run.attrs["world_size"]) > 1 else "")
                + (f" {variant[id(run)]}" if variant[id(run)] else "")
                + (f" seed {seed}" if seed else "")
            )
            (line,) = ax.plot(run.evals["wall_s"], run.evals["test_accuracy"], marker=".", label=label)
            ax_epochs.plot(run.evals["epoch"], run.evals["test_accuracy"], marker=".", color=line.get_color())
    target = next((r["target_accuracy"] for r in rows if r["target_accuracy"] is not None), None)
    if target is not None:
        for a in (ax, ax_epochs):
            a.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.2f}%" if a is ax else None)
        ax.set_ylim(bottom=max(0.0, target - 20), top=max(100.0, target) + 0.5)
    ax.set(xlabel="wall-clock time (s)", ylabel="test accuracy (%)", title="Accuracy against time")
    ax_epochs.set(xlabel="epochs (of one process's data)", title="Accuracy against epochs")
    ax.legend(fontsize=8)
    save(fig, "accuracy_vs_time")

    labels = [f"{method_label(r)}\nnp{r['world_size']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, len(rows)), 4))
    bottom = np.zeros(len(rows))
    for field, name in (
        ("compute_s_per_round", "compute"),
        ("data_s_per_round", "data"),
        ("sync_s_per_round", "synchronisation"),
    ):
        vals = np.array([r[field] for r in rows])
        ax.bar(x, vals, bottom=bottom, label=name)
        bottom += vals
    ax.set_xticks(x, labels)
    ax.set(ylabel="seconds per round (mean over ranks)", title="Where a round goes")
    ax.legend()
    save(fig, "round_breakdown")

    fig, ax = plt.subplots(figsize=(max(5, len(rows)), 4))
    ax.bar(x, [r["bytes_per_round"] / 1e6 for r in rows])
    ax.set_xticks(x, labels)
    ax.set(ylabel="MB per round, all ranks", title="Communication per round")
    save(fig, "bytes_per_round")

    balanced = [run for run in runs if "blocks" in run.rounds and len(run.rounds["round"])]
    if balanced:  # IST: each subnetwork's blocks per round against the round's wall time
        fig, axes = plt.subplots(len(balanced), 1, figsize=(8, 3 * len(balanced)), squeeze=False)
        for ax, run in zip(axes[:, 0], balanced):
            rounds, blocks = run.rounds["round"], run.rounds["blocks"]
            for s in range(blocks.shape[1]):
                ax.step(rounds, blocks[:, s], where="post", label=f"subnetwork {s}")
            ax.set(xlabel="round", ylabel="blocks (-1: full model)")
            ax.set_title(f"{run.path.name}: {run.config.get('balance', 'none')} balance", fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
            twin = ax.twinx()
            twin.plot(rounds, np.diff(run.rounds["wall_s"], prepend=0.0), "k.", markersize=3)
            twin.set_ylabel("round wall time (s)")
        save(fig, "blocks_per_round")

    probed = noise_summaries(runs)
    if probed:  # B_simple through training against the global batch, and the steps it predicts
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        counts = 2 ** np.arange(8)
        for run, s in probed:
            name = f"{run.attrs['method']} np{run.attrs['world_size']}"
            grad_sq, trace = noise_scale.probe_estimates(run.noise)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_probe = np.where(grad_sq > 0, trace / grad_sq, np.nan)
            axes[0].plot(run.noise["epoch"], per_probe, ".", label=f"{name}: per probe")
            axes[0].axhline(s["b_simple"], ls="--", lw=1, label=f"{name}: B_simple {s['b_simple']:,.0f}")
            b = s["batch"]
            axes[1].plot(
                counts,
                noise_scale.step_speedup(s["b_simple_late"] or s["b_simple"], b, counts),
                marker="o",
                label=f"{name} (batch {b} a process)",
            )
        for n in counts[1:5]:
            axes[0].axhline(n * probed[0][1]["batch"], color="grey", lw=0.5)
            axes[0].annotate(f"{n} x {probed[0][1]['batch']}", (0, n * probed[0][1]["batch"]), fontsize=7, color="grey")
        axes[0].set(
            xlabel="epoch", ylabel="images", yscale="log", title="Gradient noise scale against the global batch"
        )
        axes[1].plot(counts, counts, "k--", label="linear")
        axes[1].set(
            xlabel="processes (global batch = N x batch)",
            ylabel="fewer steps than one process",
            title="Steps saved by data parallelism (predicted)",
        )
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log", base=2)
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "noise_scale")
    return written


def projection(runs: list[Run], rows: list[dict], net) -> dict | None:
    """Projected speedups from the first one-process run's measured step time, with the
    measured speedups beside the projected ones at the world sizes that were run."""
    from .projection import caveats, project, workload_from_run

    singles = [r for r in runs if int(r.attrs["world_size"]) == 1]
    splits = sorted({r["data_split"] for r in rows if r["world_size"] > 1})
    split = splits[0] if len(splits) == 1 else "shard"  # a folder of both: the sharded projection
    w = workload_from_run(singles[0], split) if singles else None
    if w is None:
        return None
    curves = project(w, net)
    check = [
        {
            "method": r["method"],
            "world_size": r["world_size"],
            "measured": r["speedup"],
            "projected": curves[r["method"]].get(r["world_size"]),
        }
        for r in rows
        if r["method"] in curves and r["world_size"] > 1 and r["data_split"] == split
    ]
    return {
        "data_split": split,
        "latency_s": net.latency_s,
        "bandwidth_Bps": net.bandwidth_Bps,
        "step_s": w.step_s,
        "speedup": {m: {str(n): v for n, v in c.items()} for m, c in curves.items()},
        "check": check,
        "caveats": {str(n): caveats(n, w) for n in curves["ist"] if caveats(n, w)},
    }


def format_projection(p: dict) -> str:
    lines = [
        f"projection, --data-split {p.get('data_split', 'shard')} (step {p['step_s']:.3f} s measured; latency {p['latency_s']:g} s, "
        f"bandwidth {p['bandwidth_Bps']:.3g} B/s):"
    ]
    ns = list(p["speedup"]["ist"])
    lines.append("  GPUs       " + " ".join(f"{n:>7s}" for n in ns))
    marked = p.get("caveats", {})
    for m, c in p["speedup"].items():
        lines.append(f"  {m:10s} " + " ".join(f"{c[n]:6.2f}{'*' if n in marked else ' '}" for n in ns))
    if marked:
        first = min(marked, key=int)
        lines.append(
            f"  * time only, not accuracy: from {first} GPUs, {'; '.join(marked[first])}"
            + (f" (at {max(marked, key=int)}: {'; '.join(marked[max(marked, key=int)])})" if len(marked) > 1 else "")
        )
    for c in p["check"]:
        proj = "-" if c["projected"] is None else f"{c['projected']:.2f}"
        lines.append(f"  check {c['method']} np{c['world_size']}: measured {c['measured']:.2f}x, projected {proj}x")
    return "\n".join(lines)


def draw_projection(p: dict, rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    marked = p.get("caveats", {})
    for m, curve in p["speedup"].items():
        ok = [(int(n), v) for n, v in curve.items() if n not in marked]
        beyond = [(int(n), v) for n, v in curve.items() if n in marked]
        (line,) = ax.plot(*zip(*ok), label=f"{m} (projected)")
        if beyond:  # past the data or the published batch sizes: dotted, hollow
            ax.plot(*zip(*([ok[-1]] + beyond)), ":", marker="o", fillstyle="none", color=line.get_color())
        pts = [(r["world_size"], r["speedup"]) for r in rows if r["method"] == m and r["world_size"] > 1]
        if pts:
            ax.plot(*zip(*pts), "o", color=line.get_color(), label=f"{m} (measured)")
    ns = [int(n) for n in p["speedup"]["ist"]]
    ax.plot(ns, ns, "k--", label="linear")
    if marked:
        ax.plot(
            [],
            [],
            "k:",
            marker="o",
            fillstyle="none",
            label=f"from {min(marked, key=int)} GPUs: time only (epoch or batch beyond the data)",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="GPUs",
        ylabel="speedup over one GPU",
        title=f"Projected speedup (latency {p['latency_s']:g} s, {p['bandwidth_Bps'] / 1e9:g} GB/s)",
    )
    ax.legend(fontsize=8)
    paths = []
    for ext in ("png", "svg"):
        paths.append(out / f"projection.{ext}")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
