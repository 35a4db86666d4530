"""tools/gpu-check.sh, the first command on a GPU machine, run here the way CI runs it: on the
CPU (--device cpu), same checks and same JSON. (No GPU here: the CUDA side of each check runs
only where one is lent; docs/gpu.md says whether it has.)"""

import json

import pytest
import torch

from hist.engine.precision import precision_supported

from helpers import ROOT, run

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

CPU = torch.device("cpu")
# Each precision is checked where the device has a fast path for it: a CPU emulates fp16
# (tests/test_train.py trains and resumes fp16 on the CPU), bf16 needs AVX-512 BF16 or AMX.
NAMES = {
    precision: {f"train-{loader}-{precision}{layout}" for loader in ("device", "streaming")}
    for precision, layout in (("fp32", ""), ("bf16", "-channels_last"), ("fp16", "-channels_last"))
}
SKIPPED = {name: why for p, names in NAMES.items() if (why := precision_supported(p, CPU)) for name in names}
TRAININGS = set().union(*NAMES.values()) - set(SKIPPED)


def test_gpu_check_passes_on_the_cpu_with_its_json(tmp_path):
    proc = run(["bash", ROOT / "tools" / "gpu-check.sh", "--device", "cpu", "--out", tmp_path], timeout=900)
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["device"] == "cpu"
    checks = report["checks"]
    assert TRAININGS | {"ranks2-ist", "ranks2-dp"} == set(checks)  # Horovod and MPI are here
    assert report["skipped"] == SKIPPED and SKIPPED.keys() >= NAMES["fp16"]
    for name in TRAININGS:
        c = checks[name]
        assert c["ok"] and c["error"] is None, (name, c)
        assert c["stopped_on_signal"] and c["resumed_at_round"] and c["evaluations"] >= 2
        assert abs(c["phase_ratio"] - 1) <= 0.10 and c["images_per_s"] > 0
    assert set(report["images_per_s"]) == TRAININGS
    assert all(checks[f"ranks2-{m}"]["final_accuracy"] >= 0 for m in ("ist", "dp"))


def test_a_failing_check_gives_its_error_line_and_a_nonzero_exit(tmp_path):
    # A GPU is asked for on a machine without one: one check, its line, exit 1, still JSON.
    proc = run(["bash", ROOT / "tools" / "gpu-check.sh", "--out", tmp_path], check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["ok"] is False
    assert "no usable GPU" in report["checks"]["cuda"]["error"]
