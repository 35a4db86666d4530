"""Command lines: hist-train, hist-report, hist-bench.

Every command turns a HistError into one line on stderr and a non-zero exit; `--debug`
shows the traceback. An unexpected failure on one rank of a multi-rank job aborts the whole
MPI job (with the rank and host named) so that no other rank waits for it forever.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import traceback
from pathlib import Path

import click

from . import choices
from .config import Config, default_arch, flag
from .errors import CollectiveError, HistError
from .presets import PRESETS
from .world import world_info_from_env


def _fail(prog: str, message: str, code: int = 2) -> None:
    world = world_info_from_env()
    where = f" [{world.where()}]" if world.size > 1 else ""
    click.echo(f"{prog}: error{where}: {message}", err=True)
    sys.exit(code)


def user_errors(prog: str):
    """Decorator: HistError -> one line and exit 2; anything else -> one line, MPI abort, exit 1."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, debug=False, **kwargs):
            try:
                return fn(*args, **kwargs)
            except HistError as e:
                if debug:
                    traceback.print_exc()
                if isinstance(e, CollectiveError):
                    if world_info_from_env().rank != 0:
                        sys.exit(2)  # every rank raised it together; rank 0 says it once
                    _fail(prog, str(e), 2)
                # Raised on this rank alone once MPI runs (an unreadable image in its shard, say):
                # say it, then end the other ranks, which would otherwise wait in a collective.
                world = world_info_from_env()
                click.echo(f"{prog}: error{f' [{world.where()}]' if world.size > 1 else ''}: {e}", err=True)
                from .comm import abort_world_if_running

                abort_world_if_running(2)
                sys.exit(2)
            except KeyboardInterrupt:
                _fail(prog, "interrupted", 130)
            except Exception as e:  # a bug or a failing library: name it, never hang the others
                if debug:
                    traceback.print_exc()
                world = world_info_from_env()
                click.echo(
                    f"{prog}: error [{world.where()}]: {type(e).__name__}: {e} (run with --debug for the traceback)",
                    err=True,
                )
                from .comm import abort_world_if_running

                abort_world_if_running(1)
                sys.exit(1)

        return click.option("--debug", is_flag=True, help="Show tracebacks.")(inner)

    return wrap


# ---------------------------------------------------------------- hist-train

_TYPES = {"int": int, "float": float, "str": str}


def config_options(command):
    """hist-train's options, read from their one declaration in `Config`: flag, default, help,
    choices, and whether the value is a path. A bool that is off by default is a flag; one that
    is on, or decided at run time (None), comes with its --no- form."""
    for f in reversed(dataclasses.fields(Config)):
        meta = f.metadata
        if not meta["cli"]:
            continue
        name, kwargs = flag(f.name), {"help": meta["help"], "default": f.default}
        if f.type == "bool" and f.default is False:
            kwargs["is_flag"] = True
        elif f.type in ("bool", "bool | None"):
            name = f"{name}/--no-{name[2:]}"
        elif meta["choices"]:
            kwargs["type"] = click.Choice(meta["choices"])
        elif meta["path"]:
            kwargs["type"] = click.Path(path_type=str)
        else:
            kwargs["type"] = _TYPES[f.type]
        if f.name == "arch":
            kwargs["default"] = None  # the dataset's (config.default_arch), filled in by `train`
        command = click.option(name, **kwargs)(command)
    return command


def _apply_preset(ctx: click.Context, param, name):
    """Eager: the preset's values become the defaults of the options parsed after it."""
    if name:
        if name not in PRESETS:
            raise click.BadParameter(f"choose one of {', '.join(PRESETS)}", ctx, param)
        ctx.default_map = {**(ctx.default_map or {}), **PRESETS[name][1]}
    return name


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("dataset")
@click.option(
    "--preset",
    is_eager=True,
    expose_value=False,
    callback=_apply_preset,
    help="Defaults from a named preset (paper, cpu, smoke); options given here win.",
)
@config_options
@user_errors("hist-train")
def train(dataset, **options):
    """Train a pre-activation ResNet on DATASET (hist.choices.DATASETS): cifar10, cifar100, svhn,
    synthetic, or an image folder: imagefolder, imagenet, imagenette, imagewoof, tiny-imagenet."""
    from .launch import run_training

    options["arch"] = options["arch"] or default_arch(dataset)
    cfg = Config(dataset=dataset, **options)
    result = run_training(cfg)
    if result.stopped_early:
        sys.exit(3)


# ---------------------------------------------------------------- hist-report


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Folder for the figures [default: beside the first input]."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "paper", "epochs"]),
    default="table",
    help="paper: the published layout (a row per method, a column per process count), Markdown; "
    "epochs: each run's test accuracy at every evaluation, a column per epoch, Markdown.",
)
@click.option(
    "--oversubscribed-above",
    type=int,
    help="paper: mark times of runs with more processes than this as not meaningful.",
)
@click.option(
    "--target-accuracy", type=float, help="Accuracy (%) for time-to-accuracy [default: 90% of the best final accuracy]."
)
@click.option("--merge", type=click.Path(path_type=Path), help="Also copy all runs into this one HDF5 file.")
@click.option("--no-figures", is_flag=True, help="Print the table only.")
@click.option("--latency", default=5e-6, help="Projection: seconds per message.")
@click.option("--bandwidth", default=12.5e9, help="Projection: bytes per second per link.")
@user_errors("hist-report")
def report(paths, output, fmt, oversubscribed_above, target_accuracy, merge, no_figures, latency, bandwidth):
    """Speedup, time-to-accuracy and communication from timing files or folders of them."""
    from .analysis import report as rep
    from .analysis.projection import Network

    runs = rep.load_runs(paths, skip_damaged=lambda line: click.echo(f"hist-report: {line}", err=True))
    rows, notes = rep.summarise(runs, target_accuracy)
    proj = rep.projection(runs, rows, Network(latency, bandwidth))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))  # the table only: one object per group
    elif fmt == "paper":
        click.echo(rep.format_paper_table(rows, notes, oversubscribed_above))
    elif fmt == "epochs":
        click.echo(rep.format_epoch_table(runs, notes))
    else:
        click.echo(rep.format_table(rows, notes))
        if proj is not None:
            click.echo(rep.format_projection(proj))
        noise = rep.format_noise(runs)
        if noise:
            click.echo(noise)
    if merge:
        rep.merge(runs, merge)
    if not no_figures:
        out = output or (paths[0] if paths[0].is_dir() else paths[0].parent) / "report"
        written = rep.draw_figures(runs, rows, out)
        if proj is not None:
            written += rep.draw_projection(proj, rows, out)
        for path in written:
            click.echo(f"wrote {path}", err=True)
    claim = rep.format_claim(rows) if fmt == "table" else ""
    if claim:  # last: what the table and accuracy_vs_time say, in words
        click.echo(claim)


# ---------------------------------------------------------------- hist-bench


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quick", is_flag=True, help="Tiny sizes: a smoke test of the benchmark itself.")
@click.option("--width", default=0.25, help="Channel multiplier of the ResNet-101 for the step timings.")
@click.option("--run-width", default=0.125, help="Channel multiplier of the ResNet-101 for the hist-train runs.")
@click.option("--batch-size", default=64)
@click.option("--device", default="auto", type=click.Choice(choices.DEVICES))
@click.option(
    "--data-dir",
    type=click.Path(path_type=str),
    help="Folder with cifar-10-batches-py for the accuracy runs [default: $HIST_DATA].",
)
@click.option("--skip-runs", is_flag=True, help="Only the in-process measurements (no hist-train runs).")
@click.option(
    "--backend",
    default="auto",
    type=click.Choice(choices.BACKENDS),
    help="Engine of the hist-train runs (horovod under horovodrun, torch under torchrun; auto: Horovod where it imports).",
)
@click.pass_context
@user_errors("hist-bench")
def bench(ctx, as_json, quick, width, run_width, batch_size, device, data_dir, skip_runs, backend):
    """Measure step-time ratios, bytes per round, speedup, sync share, pipeline and accuracy.

    `hist-bench accuracy` runs the accuracy suite instead."""
    if ctx.invoked_subcommand is not None:
        return
    from .analysis import bench as b
    from .launch import resolve_device

    results = b.run(
        quick=quick,
        width=width,
        run_width=run_width,
        batch_size=batch_size,
        device=resolve_device(device, 0),
        data_dir=data_dir,
        skip_runs=skip_runs,
        backend=backend,
    )
    click.echo(json.dumps(results, indent=2) if as_json else b.format_table(results))


@bench.command("streaming", context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("dataset", type=click.Choice(choices.FOLDER_DATASETS))
@click.option("--data-dir", required=True, type=click.Path(path_type=str), help="Folder with train/ and val/.")
@click.option("--arch", default="imagenet_preact_resnet101")
@click.option("--width", default=0.0625)
@click.option("--crop", default=128)
@click.option("--eval-resize", default=146)
@click.option("--batch-size", default=64)
@click.option("--workers", default=2, help="Decoding processes.")
@click.option("--batches", default=30, help="Batches timed after 3 of warm-up.")
@click.option("--device", default="auto", type=click.Choice(choices.DEVICES))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors("hist-bench")
def streaming_bench(dataset, data_dir, arch, width, crop, eval_resize, batch_size, workers, batches, device, as_json):
    """The streaming loader's images/s against the model's training images/s on DATASET."""
    from .analysis import bench as b
    from .launch import resolve_device

    r = b.streaming_throughput(
        dataset, data_dir, arch, width, crop, eval_resize, batch_size, workers, resolve_device(device, 0), batches
    )
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        click.echo(
            f"{dataset} ({r['train_images']} training images), crop {crop}, batch {batch_size}, "
            f"{workers} decoding process(es): loader {r['loader_images_per_s']:.0f} images/s, "
            f"{arch} width {width} trains {r['model_images_per_s']:.0f} images/s: ratio {r['ratio']:.2f}x"
        )


@bench.command("steps", context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--widths", default="0.0625,0.25", help="Channel multipliers of the ResNet-101, comma-separated.")
@click.option("--batch-size", default=128)
@click.option("--pairs", default=20, help="Pairs of steps (hist's, the bare one) timed after 2 of warm-up.")
@click.option("--device", default="auto", type=click.Choice(choices.DEVICES))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors("hist-bench")
def steps_bench(widths, batch_size, pairs, device, as_json):
    """hist's training step over a bare PyTorch step of the same subnetwork: one process, and
    IST at 2 processes (under horovodrun, where it is installed)."""
    from .analysis import bench as b
    from .launch import resolve_device

    try:
        chosen = tuple(float(w) for w in widths.split(","))
    except ValueError:
        raise HistError(f"--widths {widths!r}: give channel multipliers as comma-separated numbers, e.g. 0.0625,0.25")
    r = b.bare_steps(chosen, batch_size, pairs, resolve_device(device, 0), b.can_launch())
    click.echo(json.dumps(r, indent=2) if as_json else b.format_bare_steps(r))


@bench.command("engines", context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--methods", default="ist,dp", help="Methods to run at 2 processes, comma-separated.")
@click.option("--repeats", default=3, help="Runs of each method under each engine, alternating.")
@click.option("--width", default=0.0625, help="Channel multiplier of the ResNet-101.")
@click.option("--batch-size", default=32)
@click.option("--local-iters", default=10)
@click.option("--synthetic-size", default=2560, help="Training images: one epoch per run.")
@click.option("--device", default="auto", type=click.Choice(choices.DEVICES))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors("hist-bench")
def engines_bench(methods, repeats, width, batch_size, local_iters, synthetic_size, device, as_json):
    """Seconds per epoch and round synchronisation of each method at 2 processes under Horovod + MPI
    (horovodrun) and under torch.distributed (torchrun), side by side in one run."""
    from .analysis import bench as b
    from .launch import resolve_device

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    wrong = [m for m in chosen if m not in choices.METHODS]
    if wrong or not chosen:
        raise HistError(f"--methods {methods!r}: give some of {', '.join(choices.METHODS)}, comma-separated")
    missing = [e for e in b.ENGINES if not b.can_launch(e)]
    if missing:
        raise HistError(f"hist-bench engines: no launcher for {', '.join(missing)} in this Python's bin folder")
    r = b.engines(chosen, repeats, width, batch_size, local_iters, synthetic_size, resolve_device(device, 0).type)
    click.echo(json.dumps(r, indent=2) if as_json else b.format_engines(r))


@bench.command("bytes", context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--topk", default="0,0.01", help="--shared-topk values, comma-separated (0 = off).")
@click.option("--rounds", default=20, help="Rounds of plans averaged (block traffic varies by round).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors("hist-bench")
def bytes_bench(topk, rounds, as_json):
    """Bytes per round of every --shared-precision, --shared-topk and --block-precision at
    S = N = 2, 4, 8 (ResNet-101, CIFAR-100 head, momentum averaged), counted, not timed."""
    from .analysis import bench as b

    try:
        fractions = tuple(float(v) for v in topk.split(","))
    except ValueError:
        raise HistError(f"--topk {topk!r}: give fractions in [0, 1), comma-separated, e.g. 0,0.01")
    if not fractions or any(not 0 <= f < 1 for f in fractions):
        raise HistError(f"--topk {topk!r}: give fractions in [0, 1), comma-separated, e.g. 0,0.01")
    rows = b.setting_bytes(rounds, fractions)
    click.echo(json.dumps(rows, indent=2) if as_json else b.format_setting_bytes(rows))


def _int_list(least: int):
    def parse(ctx, param, value: str) -> list[int]:
        try:
            out = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of integers")
        if not out or min(out) < least:
            raise click.BadParameter(f"{value!r}: give integers of at least {least}, comma-separated")
        return out

    return parse


@bench.command("accuracy", context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--dataset", default="cifar10", help="cifar10, cifar100, svhn or synthetic.")
@click.option("--preset", default="cpu", type=click.Choice(list(PRESETS)), help="Settings of every run.")
@click.option(
    "--out",
    "folder",
    type=click.Path(path_type=Path),
    help="Folder for the runs [default: runs/accuracy-<preset>-<dataset>].",
)
@click.option("--processes", default="1,2", callback=_int_list(1), help="Process counts, e.g. 1,2,4,8.")
@click.option("--methods", default="ist,local-sgd", help="Methods beyond one process: ist, local-sgd, dp.")
@click.option("--seeds", default="0", callback=_int_list(0), help="Seeds, e.g. 0,1,2 (mean and spread in the table).")
@click.option(
    "--data-split",
    type=click.Choice(choices.DATA_SPLITS),
    default=None,
    help="The protocol of every run (hist-train --data-split) [default: the preset's].",
)
@click.option(
    "--oversubscribed-above",
    type=int,
    default=None,
    help="Mark the times of runs with more processes than this (default: the machine's cores).",
)
@click.option(
    "--backend",
    type=click.Choice(choices.BACKENDS),
    default=None,
    help="The engine of every multi-process run: horovod (under horovodrun), torch (under torchrun), "
    "auto (Horovod where it imports) [default: hist-train's].",
)
@click.argument("train_options", nargs=-1, type=click.UNPROCESSED)
@user_errors("hist-bench")
def accuracy_suite(
    dataset, preset, folder, processes, methods, seeds, data_split, oversubscribed_above, backend, train_options
):
    """Run one preset under every method and process count, then print the published table.

    Options after `--` go to every hist-train run, e.g. `-- --data-dir ../shared/data/cifar10`.
    A finished run is kept, an interrupted one resumed: run the same command again to continue."""
    import os

    from .analysis import report as rep
    from .analysis.suite import run_suite

    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in method_list if m not in choices.METHODS]
    if bad:
        raise HistError(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(choices.METHODS)}")
    if data_split:
        train_options = ("--data-split", data_split, *train_options)
    if backend:
        train_options = ("--backend", backend, *train_options)
    folder = folder or Path("runs") / f"accuracy-{preset}-{dataset}"
    try:  # the settings every run resolves to: the preset under the options given, as hist-train parses them
        ctx = train.make_context("hist-train", [dataset, "--preset", preset, *train_options])
        resolved = Config(**{k: v for k, v in ctx.params.items() if k != "debug"})
    except click.ClickException as e:
        raise HistError(f"the hist-train options {' '.join(train_options)!r} do not parse: {e.format_message()}")
    paths = run_suite(
        dataset,
        preset,
        folder,
        processes,
        method_list,
        seeds,
        list(train_options),
        resolved,
        log=lambda m: click.echo(m, err=True),
    )
    runs = rep.load_runs(paths)
    rows, notes = rep.summarise(runs)
    limit = oversubscribed_above if oversubscribed_above is not None else os.cpu_count()
    if any(r["world_size"] > limit for r in rows):
        notes.append(
            f"runs with more than {limit} processes share {limit} cores: their accuracy counts, their times do not"
        )
    table = rep.format_paper_table(rows, notes, limit)
    (folder / "report.md").write_text(table + "\n")
    (folder / "report.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2) + "\n")
    written = rep.draw_figures(runs, rows, folder / "report")
    click.echo(table)
    click.echo(f"wrote {folder / 'report.md'}, {folder / 'report.json'} and {len(written)} figures", err=True)
