"""tools/gpu-check.sh, the first command on a GPU machine, run here the way CI runs it: on the
CPU (--device cpu), same checks and same JSON. (No GPU here: the CUDA side of each check runs
only where one is lent; docs/gpu.md says whether it has.)"""

import json
import sys

import pytest
import torch

from hist.engine.precision import precision_supported

from helpers import ROOT, run

CPU = torch.device("cpu")
# Each precision is checked where the device has a fast path for it: a CPU emulates fp16
# (tests/test_train.py trains and resumes fp16 on the CPU), bf16 needs AVX-512 BF16 or AMX.
NAMES = {
    precision: {f"train-{loader}-{precision}{layout}" for loader in ("device", "streaming")}
    for precision, layout in (("fp32", ""), ("bf16", "-channels_last"), ("fp16", "-channels_last"))
}
SKIPPED = {name: why for p, names in NAMES.items() if (why := precision_supported(p, CPU)) for name in names}
TRAININGS = set().union(*NAMES.values()) - set(SKIPPED)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gpu_check_passes_on_the_cpu_with_its_json(tmp_path):
    # two checks at a time, as on CI's 2 cores (on a GPU each check has it to itself)
    proc = run(
        ["bash", ROOT / "tools" / "gpu-check.sh", "--device", "cpu", "--jobs", "2", "--out", tmp_path], timeout=900
    )
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["device"] == "cpu"
    checks = report["checks"]
    ranks2 = {"ranks2-ist", "ranks2-dp", "ranks2-torch-ist", "ranks2-torch-dp"}  # Horovod + MPI, torch.distributed
    assert TRAININGS | ranks2 | {"bare-step-np1", "bare-step-ranks2"} == set(checks)
    for name in ("bare-step-np1", "bare-step-ranks2"):  # hist's step beside a bare one: measured, not judged
        c = checks[name]
        assert c["ok"] and set(c["bare_step_ratio"]) == {"0.0625"} and 0.5 < c["bare_step_ratio"]["0.0625"] < 2
        assert c["step_s"]["0.0625"]["bare_step_s"] > 0 and isinstance(c["met"], bool)
    assert report["skipped"] == SKIPPED and SKIPPED.keys() >= NAMES["fp16"]
    for name in TRAININGS:
        c = checks[name]
        assert c["ok"] and c["error"] is None, (name, c)
        assert c["stopped_early"] and c["resumed_at_round"] == [3] and c["evaluations"] >= 2
        assert abs(c["phase_ratio"] - 1) <= 0.10 and c["images_per_s"] > 0
        assert c["data_s"] >= 0 and c["compute_s"] > 0 and c["data_per_compute"] >= 0  # does the loader keep up
    assert set(report["images_per_s"]) == TRAININGS
    assert all(checks[name]["ok"] and checks[name]["final_accuracy"] >= 0 for name in ranks2)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_failing_check_gives_its_error_line_and_a_nonzero_exit(tmp_path):
    # A GPU is asked for on a machine without one: one check, its line, exit 1, still JSON.
    proc = run(["bash", ROOT / "tools" / "gpu-check.sh", "--out", tmp_path], check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["ok"] is False
    assert "no usable GPU" in report["checks"]["cuda"]["error"]


def test_on_cuda_the_runs_are_sized_for_the_device_and_2_ranks_need_2_gpus():
    # No GPU here: the sizes and the skip rule are checked as arithmetic and a decision.
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    for device, least_steps in (("cpu", 4), ("cuda", 18)):
        train, array, folder = gpu_check.sizes(device)
        for data, images in ((array, array["synthetic_size"]), (folder, 600)):  # 600: the sample, or the made folder
            steps = data.get("local_iters", train["local_iters"])
            rounds = data["epochs"] * (images // data["batch_size"]) / steps
            # every size: a checkpoint every 2 rounds, the stop after round 3, more rounds after it
            assert rounds > gpu_check.STOP_AFTER_ROUNDS + 1, (device, data)
            assert train["checkpoint_every"] == 2 and gpu_check.STOP_AFTER_ROUNDS == 3
            assert steps >= least_steps and data["eval_every_epochs"] < data["epochs"]  # two evaluations at least
    train, array, _ = gpu_check.sizes("cuda")  # a round of 50 steps of 128: the HDF5 append is small beside it
    assert train["local_iters"] == 50 and array["batch_size"] == 128

    ready = {"horovod.torch": True, "mpi4py": True, "horovodrun": "/usr/bin/horovodrun"}
    assert gpu_check.ranks2_skipped(ready, "cpu", 0) is None  # the CPU is shared by both ranks
    assert gpu_check.ranks2_skipped(ready, "cuda", 2) is None
    assert "1 GPU visible: 2 ranks need 2 GPUs" in gpu_check.ranks2_skipped(ready, "cuda", 1)
    assert "missing" in gpu_check.ranks2_skipped({**ready, "mpi4py": "ImportError"}, "cuda", 8)
    ready = {**ready, "torch.distributed": True, "torchrun": "/usr/bin/torchrun"}
    assert gpu_check.ranks2_skipped({**ready, "horovod.torch": "ImportError"}, "cpu", 0, "torch") is None
    assert "torchrun is missing" in gpu_check.ranks2_skipped({**ready, "torchrun": None}, "cpu", 0, "torch")
    assert "1 GPU visible" in gpu_check.ranks2_skipped(ready, "cuda", 1, "torch")
    assert (
        gpu_check.ranks2_name("ist", "horovod") == "ranks2-ist"
        and gpu_check.ranks2_name("dp", "torch") == "ranks2-torch-dp"
    )
