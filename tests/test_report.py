"""Timing files and hist-report on files the test writes with known values."""

import json
import subprocess
import sys

import h5py
import pytest
from click.testing import CliRunner

from hist.analysis.report import load_runs, merge, summarise
from hist.cli import report
from hist.io.timings import SCHEMA_VERSION, TimingWriter, read_run

BIN = __import__("pathlib").Path(sys.executable).parent


def hist_report(*args):
    """`hist-report ARGS` in this process, as its console script runs it (click's standalone mode,
    the exit status in SystemExit): a process per call costs seconds of imports and tests nothing
    more; test_hardening keeps real hist-report processes (a fuzz of damaged files, one bad file)."""
    result = CliRunner().invoke(report, [str(a) for a in args], prog_name="hist-report")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def write_run(
    path, method, world, seconds_per_round, rounds=4, accs=(50.0, 80.0), sent=1000, dataset="synthetic", **extra
):
    meta = {
        "method": method,
        "dataset": dataset,
        "arch": "preact_resnet18",
        "width": 0.25,
        "world_size": world,
        "subnets": world,
        "config": {"seed": 0, "batch_size": 10, "local_iters": 10},
        "hosts": ["h"] * world,
        "train_images": 200,
        **extra,
    }
    w = TimingWriter(path, meta, world)
    for r in range(rounds):
        per_rank = {
            "compute_s": [seconds_per_round * 0.5] * world,
            "data_s": [seconds_per_round * 0.25] * world,
            "sync_s": [seconds_per_round * 0.25] * world,
            "bytes_sent": [sent] * world,
            "bytes_received": [sent] * world,
            "loss": [1.0 / (r + 1)] * world,
        }
        w.add_round(r, 10, (r + 1) * 0.5, (r + 1) * seconds_per_round, per_rank)
        if r % 2 == 1:
            w.add_eval(r, (r + 1) * 0.5, (r + 1) * seconds_per_round, 1.0, accs[r // 2], accs[r // 2] + 20)
    w.finish("completed", rounds * seconds_per_round)
    return path


@pytest.fixture
def runs_dir(tmp_path):
    write_run(tmp_path / "single.h5", "single", 1, 4.0)
    write_run(tmp_path / "ist2.h5", "ist", 2, 1.0, sent=300)
    write_run(tmp_path / "dp2.h5", "dp", 2, 2.0, accs=(40.0, 70.0))
    return tmp_path


def test_table_values_are_exact(runs_dir):
    rows, notes = summarise(load_runs([runs_dir]), target_accuracy=60.0)
    by = {(r["method"], r["world_size"]): r for r in rows}
    single, ist, dp = by[("single", 1)], by[("ist", 2)], by[("dp", 2)]
    assert single["seconds_per_epoch"] == pytest.approx(8.0)  # 16 s over 2 epochs
    assert ist["seconds_per_epoch"] == pytest.approx(2.0)
    assert ist["speedup"] == pytest.approx(4.0) and dp["speedup"] == pytest.approx(2.0)
    # target 60%: single reaches it at its 2nd eval (16 s), ist at 4 s, dp at 8 s
    assert single["time_to_target_s"] == pytest.approx(16.0)
    assert ist["speedup_to_target"] == pytest.approx(4.0) and dp["speedup_to_target"] == pytest.approx(2.0)
    assert ist["bytes_per_round"] == 600 and dp["bytes_per_round"] == 2000
    assert ist["compute_s_per_round"] == pytest.approx(0.5) and ist["sync_s_per_round"] == pytest.approx(0.25)
    assert dp["final_accuracy"] == 70.0 and dp["final_top5"] == 90.0
    assert all(r["baseline"] == "1 process" for r in rows)


def test_missing_baseline_is_said(tmp_path):
    write_run(tmp_path / "ist2.h5", "ist", 2, 2.0)
    write_run(tmp_path / "ist4.h5", "ist", 4, 1.0)
    rows, notes = summarise(load_runs([tmp_path]))
    assert [r["speedup"] for r in rows] == [pytest.approx(1.0), pytest.approx(2.0)]
    assert any("no one-process run" in n for n in notes)


def test_cli_prints_table_json_and_writes_valid_figures(runs_dir):
    out = runs_dir / "figs"
    proc = hist_report(runs_dir, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout and "ist" in proc.stdout
    assert "projection" in proc.stdout and "check ist np2: measured 4.00x" in proc.stdout
    for name in ("speedup", "accuracy_vs_time", "round_breakdown", "bytes_per_round", "projection"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert (out / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    proc = hist_report(runs_dir / "ist2.h5", runs_dir / "single.h5", "--format", "json", "--no-figures")
    rows = json.loads(proc.stdout)
    assert {r["method"] for r in rows} == {"ist", "single"}
    assert {
        "method",
        "world_size",
        "epochs",
        "seconds_per_epoch",
        "speedup",
        "final_accuracy",
        "bytes_per_round",
    } <= set(rows[0])


def test_a_killed_run_still_reports(tmp_path):
    path = write_run(tmp_path / "killed.h5", "ist", 2, 1.0)
    with h5py.File(path, "a") as f:  # as if killed between two column writes of round 4
        f["rounds/compute_s"].resize(5, axis=0)
        f.attrs["status"] = "running"
    run = read_run(path)
    assert len(run.rounds["compute_s"]) == 4 and len(run.rounds["wall_s"]) == 4
    rows, _ = summarise([run])
    assert rows[0]["epochs"] == 2.0


def test_merge_round_trips(runs_dir, tmp_path):
    runs = load_runs([runs_dir])
    merge(runs, tmp_path / "all.h5")
    again = load_runs([tmp_path / "all.h5"])
    assert summarise(again, 60.0)[0] == summarise(runs, 60.0)[0]


def test_resumed_writer_drops_rounds_after_the_checkpoint(tmp_path):
    path = write_run(tmp_path / "r.h5", "ist", 2, 1.0, rounds=4)
    TimingWriter(path, {}, 2, start_round=2)
    run = read_run(path)
    assert run.rounds["round"].tolist() == [0, 1] and run.evals["round"].tolist() == [1]


@pytest.mark.parametrize("case", ["missing", "not_hdf5", "other_schema", "other_version", "empty_dir"])
def test_bad_inputs_give_one_line(tmp_path, case):
    target = tmp_path / "x.h5"
    if case == "not_hdf5":
        target.write_text("hello")
    elif case == "other_schema":
        with h5py.File(target, "w") as f:
            f.attrs["foo"] = 1
    elif case == "other_version":
        write_run(target, "ist", 2, 1.0)
        with h5py.File(target, "a") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION + 1
    elif case == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
    proc = hist_report(target)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hist-report: error") and str(target) in lines[0]
    assert "Traceback" not in proc.stderr


def test_default_target_is_the_single_runs_accuracy_minus_one_point(runs_dir):
    rows, notes = summarise(load_runs([runs_dir]))
    assert all(r["target_accuracy"] == pytest.approx(79.0) for r in rows)
    assert any("minus 1 point" in n for n in notes)


def test_paper_table_has_a_row_per_method_and_a_column_per_process_count(runs_dir):
    from hist.analysis.report import format_paper_table

    write_run(runs_dir / "local2.h5", "local-sgd", 2, 1.5, accs=(45.0, 78.0))
    write_run(runs_dir / "ist2-seed1.h5", "ist", 2, 1.0, accs=(50.0, 76.0), sent=300)
    rows, notes = summarise(load_runs([runs_dir]), target_accuracy=75.0)
    ist = next(r for r in rows if r["method"] == "ist")
    assert ist["runs"] == 2 and ist["final_accuracy"] == pytest.approx(78.0)
    assert ist["final_accuracy_std"] == pytest.approx(2**0.5 * 2)  # 80 and 76
    assert ist["speedup_vs_local_sgd"] == pytest.approx(1.5) and ist["wall_s"] == pytest.approx(4.0)
    table = format_paper_table(rows, notes)
    lines = table.splitlines()
    assert lines[0] == "| method | 1 process | 2 processes |"
    assert [l.split("|")[1].strip() for l in lines[2:6]] == ["single", "ist (shard)", "local-sgd (shard)", "dp (shard)"]
    ist_line = lines[3]
    assert "78.00% ± 2.83 (n=2)" in ist_line and "4.00x single" in ist_line and "1.50x local SGD" in ist_line
    assert "0.00 MB/round" in ist_line and "target at 4 s" in ist_line
    proc = hist_report(runs_dir, "--format", "paper", "--no-figures")
    assert proc.returncode == 0 and proc.stdout.startswith("| method |"), proc.stderr


def test_round_statistics_are_the_timing_files_columns():
    from hist.engine import RoundStats
    from hist.io.timings import RANK_COLUMNS

    assert list(RoundStats.__dataclass_fields__) == list(RANK_COLUMNS)


def test_a_file_from_before_top5_reads_without_it(tmp_path):
    path = write_run(tmp_path / "old.h5", "single", 1, 4.0)
    with h5py.File(path, "a") as f:
        del f["evals/test_top5"]
    rows, _ = summarise(load_runs([path]))
    assert rows[0]["final_accuracy"] == 80.0 and rows[0]["final_top5"] is None


def test_both_data_splits_are_rows_of_their_own_and_every_table_says_which(tmp_path):
    write_run(tmp_path / "single.h5", "single", 1, 4.0, accs=(50.0, 80.0))
    write_run(tmp_path / "ist-shard.h5", "ist", 2, 1.0, accs=(60.0, 78.5), data_split="shard")
    write_run(tmp_path / "ist-full.h5", "ist", 2, 3.0, accs=(77.0, 79.5), data_split="full")
    write_run(tmp_path / "lsgd-full.h5", "local-sgd", 2, 3.5, data_split="full")
    rows, notes = summarise(load_runs([tmp_path]))
    by = {(r["method"], r["data_split"], r["world_size"]): r for r in rows}
    assert set(by) == {("single", "both", 1), ("ist", "shard", 2), ("ist", "full", 2), ("local-sgd", "full", 2)}
    # target: single's 80% minus 1 = 79; the lower one 2 points below: 77
    shard, full = by[("ist", "shard", 2)], by[("ist", "full", 2)]
    assert shard["time_to_target_s"] is None and shard["time_to_lower_target_s"] == pytest.approx(4.0)
    assert full["time_to_target_s"] == pytest.approx(12.0) and full["time_to_lower_target_s"] == pytest.approx(6.0)
    # local SGD is compared within its own protocol only
    assert full["speedup_vs_local_sgd"] == pytest.approx(3.5 / 3.0) and shard["speedup_vs_local_sgd"] is None
    assert any(n.startswith("data split: full") and "shard" in n for n in notes)
    from hist.analysis.report import format_paper_table, format_table

    paper = format_paper_table(rows, notes)
    assert "| ist (full) |" in paper and "| ist (shard) |" in paper and "| single |" in paper
    assert "target - 2 at 6 s" in paper
    assert " full " in format_table(rows, notes) and "to-target-2 s" in format_table(rows, notes)


def test_files_from_before_the_option_read_as_sharded(runs_dir):
    rows, notes = summarise(load_runs([runs_dir]))
    assert {r["data_split"] for r in rows if r["world_size"] > 1} == {"shard"}
    assert notes[0].startswith("data split: shard")


def test_epoch_table_gives_each_runs_accuracy_per_evaluation(runs_dir):
    proc = hist_report(runs_dir, "--format", "epochs", "--no-figures")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| run | 1 | 2 |"  # write_run evaluates after epochs 1.0 and 2.0
    assert "| single np1 | 50.00 | 80.00 |" in lines and "| dp (shard) np2 | 40.00 | 70.00 |" in lines


def test_runs_that_differ_in_an_option_get_rows_of_their_own_and_seeds_still_average(tmp_path):
    config = lambda seed, schedule: {"seed": seed, "batch_size": 10, "local_iters": 10, "round_schedule": schedule}
    write_run(tmp_path / "single.h5", "single", 1, 4.0, config=config(0, "constant"))
    for seed, acc in ((0, 70.0), (1, 74.0)):
        write_run(tmp_path / f"c{seed}.h5", "ist", 2, 1.0, accs=(50.0, acc), config=config(seed, "constant"))
    write_run(tmp_path / "q.h5", "ist", 2, 2.0, accs=(50.0, 60.0), config=config(0, "qsr"))
    runs = load_runs([tmp_path])
    rows, notes = summarise(runs)
    by = {(r["method"], r["variant"]): r for r in rows}
    assert set(by) == {("single", ""), ("ist", "--round-schedule constant"), ("ist", "--round-schedule qsr")}
    constant, qsr = by[("ist", "--round-schedule constant")], by[("ist", "--round-schedule qsr")]
    assert constant["runs"] == 2 and constant["final_accuracy"] == pytest.approx(72.0)
    assert qsr["runs"] == 1 and qsr["final_accuracy"] == 60.0 and qsr["speedup"] == pytest.approx(2.0)
    from hist.analysis.report import format_epoch_table, format_paper_table, format_table

    assert "| ist (shard) --round-schedule qsr |" in format_paper_table(rows, notes)
    assert format_table(rows, notes).splitlines()[0].endswith("variant")
    assert "| ist (shard) --round-schedule qsr np2 | 50.00 | 60.00 |" in format_epoch_table(runs, notes)


def test_a_table_from_two_processors_says_so(tmp_path):
    """One seed on two processors of one VM kind differs by points (docs/accuracy.md): a table
    mixing them names each; one processor, or files from before the record, add nothing."""
    cpu = {"cpu": "Xeon A", "cpu_capability": "AVX512"}
    write_run(tmp_path / "single.h5", "single", 1, 4.0, versions=cpu)
    write_run(tmp_path / "ist2.h5", "ist", 2, 1.0, versions=cpu)
    write_run(tmp_path / "old.h5", "dp", 2, 1.0)  # no versions record
    _, notes = summarise(load_runs([tmp_path]))
    assert not any("processors differ" in n for n in notes)
    write_run(tmp_path / "ist2b.h5", "ist", 2, 1.0, versions={"cpu": "Xeon B", "cpu_capability": "AVX2"})
    _, notes = summarise(load_runs([tmp_path]))
    (note,) = [n for n in notes if "processors differ" in n]
    assert "Xeon A (AVX512) (2 runs); Xeon B (AVX2) (1 run)" in note


def test_each_seed_is_compared_with_the_one_process_run_of_its_seed(tmp_path):
    """The gap to one process, seed by seed over the seeds both have: a target of a point or
    two sits inside the seed-to-seed spread, and pairing by seed cancels part of it."""
    config = lambda seed: {"seed": seed, "batch_size": 10, "local_iters": 10}
    for seed, single, ist in ((0, 70.0, 69.0), (1, 72.0, 70.0), (2, 74.0, 72.0)):
        write_run(tmp_path / f"single{seed}.h5", "single", 1, 4.0, accs=(50.0, single), config=config(seed))
        write_run(tmp_path / f"ist{seed}.h5", "ist", 2, 1.0, accs=(50.0, ist), config=config(seed))
    write_run(tmp_path / "ist3.h5", "ist", 2, 1.0, accs=(50.0, 60.0), config=config(3))  # no single of seed 3
    # seed 4 was stopped after one epoch: it pairs with nothing
    write_run(tmp_path / "single4.h5", "single", 1, 4.0, rounds=2, accs=(50.0,), config=config(4))
    write_run(tmp_path / "ist4.h5", "ist", 2, 1.0, accs=(10.0, 20.0), config=config(4))
    rows, notes = summarise(load_runs([tmp_path]))
    by = {r["method"]: r for r in rows}
    ist, single = by["ist"], by["single"]
    assert ist["gap_to_single_seeds"] == 3 and ist["gap_to_single"] == pytest.approx(-5 / 3)
    assert ist["gap_to_single_se"] == pytest.approx((1 / 3) ** 0.5 / 3**0.5)
    assert single["gap_to_single"] is None and single["gap_to_single_seeds"] == 0
    # the stopped seed 4 stays out of the mean and of the target, and a note names it
    assert single["runs"] == 3 and single["final_accuracy"] == pytest.approx(72.0)
    assert ist["target_accuracy"] == pytest.approx(71.0)
    (note,) = [n for n in notes if n.startswith("left out of the means")]
    assert "single4.h5 (epoch 1.0 of 2.0)" in note and "ist" not in note
    from hist.analysis.report import format_paper_table

    assert "-1.67 ± 0.33 vs single, seed by seed (n=3)" in format_paper_table(rows, notes)


def test_the_claim_is_said_in_words_for_each_protocol(tmp_path):
    """The demo's last lines: for each protocol, IST's epoch against one process's (and against
    linear under shard), its accuracy after the same epochs (under shard, what the shared epochs
    cost), and when each first reached the target."""
    write_run(tmp_path / "single.h5", "single", 1, 4.0, accs=(50.0, 80.0))
    write_run(tmp_path / "ist-shard.h5", "ist", 2, 1.0, accs=(60.0, 78.5), data_split="shard")
    write_run(tmp_path / "ist-full.h5", "ist", 2, 3.0, accs=(77.0, 79.5), data_split="full")
    from hist.analysis.report import format_claim, format_table

    rows, notes = summarise(load_runs([tmp_path]))
    full, shard = format_claim(rows).splitlines()
    assert full.startswith("IST, --data-split full (each of 2 processes passes the whole set every epoch")
    assert "an epoch took 6.00 s against one process's 8.00 s (1.33x faster; its training alone 1.33x faster)" in full
    assert "in 12.0 s against 16.0 s, it ended at 79.50% against one process's 80.00% (-0.50 points)" in full
    assert full.endswith("first reached the target 79.00% at epoch 2 (12.0 s), one process at epoch 2 (16.0 s).")
    assert "(4.00x faster; its training alone 4.00x faster, more than the 2x of 2 processes)" in shard
    assert "(-1.50 points: at equal epochs, 1/2 of the steps cost 1.50 points)" in shard
    assert shard.endswith("It never reached the target 79.00%; one process reached it at epoch 2 (16.0 s).")
    table = format_table(rows, notes).splitlines()
    assert "vs 1p" in table[0] and any(" -1.50 " in line and " shard " in line for line in table)
    proc = hist_report(tmp_path, "--no-figures")
    assert proc.returncode == 0 and proc.stdout.rstrip().splitlines()[-1] == shard, proc.stderr


def test_an_epochs_training_is_timed_apart_from_its_evaluations(tmp_path):
    """Evaluations cost every run alike (the same test images) and are not what a method speeds
    up: the train columns leave them out; the last one, after the final round, is outside the wall."""
    for name, method, world, step, evaluation in (("single", "single", 1, 4.0, 2.0), ("ist", "ist", 2, 1.0, 2.0)):
        meta = {"method": method, "dataset": "synthetic", "arch": "preact_resnet18", "width": 0.25, "world_size": world}
        w = TimingWriter(tmp_path / f"{name}.h5", {**meta, "subnets": world, "config": {"seed": 0}}, world)
        wall = 0.0
        for r in range(4):
            wall += step
            per_rank = {k: [0.0] * world for k in ("compute_s", "data_s", "sync_s", "loss")}
            w.add_round(
                r, 10, (r + 1) * 0.5, wall, {**per_rank, "bytes_sent": [0] * world, "bytes_received": [0] * world}
            )
            if r % 2 == 1:
                wall += evaluation
                w.add_eval(r, (r + 1) * 0.5, wall, 1.0, 50.0 + r, 60.0)
        w.finish("completed", wall)
    from hist.analysis.report import evaluation_seconds

    runs = load_runs([tmp_path])
    assert sorted(evaluation_seconds(r) for r in runs) == [2.0, 2.0]
    rows, _ = summarise(runs)
    by = {r["method"]: r for r in rows}
    single, ist = by["single"], by["ist"]
    assert single["seconds_per_epoch"] == pytest.approx(9.0) and single["train_seconds_per_epoch"] == pytest.approx(8.0)
    assert ist["seconds_per_epoch"] == pytest.approx(3.0) and ist["train_seconds_per_epoch"] == pytest.approx(2.0)
    assert ist["speedup"] == pytest.approx(3.0) and ist["train_speedup"] == pytest.approx(4.0)
