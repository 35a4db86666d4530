"""The accuracy suite end to end (the smoke preset), and presets on hist-train."""

import json

import pytest

from hist.cli import train
from hist.presets import PRESETS

from helpers import BIN, hist_train, run


def suite_command(*args):
    return [BIN / "hist-bench", "accuracy", "--preset", "smoke", "--dataset", "synthetic", *args]


def test_presets_set_defaults_and_the_command_line_wins():
    """What hist-train's own parser makes of a preset and the command line, in this process (the
    accuracy suite resolves its runs' settings the same way); the smoke preset trains end to end
    in test_accuracy_suite_runs_every_method_then_reports_and_continues, and every run records
    its options as parsed (test_train, test_data_split read them back)."""
    ctx = train.make_context("hist-train", ["synthetic", "--preset", "smoke", "--arch", "preact_resnet34"])
    config = ctx.params
    smoke = PRESETS["smoke"][1]
    assert config["local_iters"] == smoke["local_iters"] and config["batch_size"] == smoke["batch_size"]
    assert config["arch"] == "preact_resnet34"  # given on the command line: wins over the preset


def test_unknown_preset_is_refused(tmp_path):
    """Refused by click while it parses, in this process (test_cli_errors.py: why)."""
    result = hist_train("synthetic", "--preset", "huge", "--out", tmp_path / "x.h5")
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.exc_info
    assert "--preset" in result.stderr and "paper, cpu, smoke" in result.stderr and "Traceback" not in result.stderr


def test_paper_and_cpu_presets_are_the_published_settings():
    for name in ("paper", "cpu"):
        p = PRESETS[name][1]
        assert p["arch"] == "preact_resnet101" and p["batch_size"] == 128 and p["lr"] == 0.1
        assert p["momentum"] == 0.9 and p["weight_decay"] == 5e-4 and p["local_iters"] == 50
    assert PRESETS["paper"][1]["width"] == 1.0 and PRESETS["paper"][1]["epochs"] == 160


@pytest.mark.multiprocess
@pytest.mark.slow
def test_accuracy_suite_runs_every_method_then_reports_and_continues(tmp_path):
    folder = tmp_path / "suite"
    cmd = suite_command("--processes", "1,2", "--methods", "ist,local-sgd", "--out", folder)
    run(cmd, timeout=900)
    names = sorted(p.name for p in folder.glob("*.h5"))
    assert names == ["ist-np2-seed0.h5", "local-sgd-np2-seed0.h5", "single-np1-seed0.h5"]
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["preset"] == "smoke" and settings["resolved"]["local_iters"] == PRESETS["smoke"][1]["local_iters"]
    command = settings["commands"]["ist-np2-seed0"]  # what ran: the mpirun line horovodrun runs
    assert "-np 2 -H localhost:2" in command and "hist-train" in command and "--method ist" in command
    table = (folder / "report.md").read_text()
    assert table.startswith("| method | 1 process | 2 processes |")
    assert [l.split("|")[1].strip() for l in table.splitlines()[2:5]] == ["single", "ist (shard)", "local-sgd (shard)"]
    rows = json.loads((folder / "report.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"single", "ist", "local-sgd"}
    assert (folder / "report" / "accuracy_vs_time.png").stat().st_size > 1000
    again = run(cmd, timeout=300)  # every run is complete: kept, not repeated
    assert again.stderr.count("already completed, kept") == 3
    # a folder holds one comparison: other settings are refused before any run, in one line
    # (in-process, on a folder written by run_suite: test_data_split)
    proc = run(cmd + ["--", "--lr", "0.5"], check=False, timeout=120)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in folder.glob("*.h5")) == names  # and nothing was run
