"""The GPU switches' single-process parts: precision, the phase clock, the transport choice.
(Their multi-process guarantees are in test_engine_parallel.py and test_train.py.)"""

import time

import pytest
import torch

from hist.comm import resolve_block_transport
from hist.engine.clock import PhaseClock
from hist.engine.precision import Precision
from hist.errors import HistError
from hist.models import build_model


def test_bf16_autocast_runs_the_convolutions_in_bf16_and_keeps_fp32_weights():
    model = build_model("preact_resnet18", 10, 0.0625).to(memory_format=torch.channels_last)
    seen = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    amp = Precision("bf16", torch.device("cpu"))
    with amp.autocast():
        loss = model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)).float().sum()
    amp.backward(loss)
    assert seen == [torch.bfloat16] and amp.scaler is None
    assert model.conv1.weight.dtype == torch.float32 and model.conv1.weight.grad.dtype == torch.float32


def test_fp16_scaler_skips_an_overflowing_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = Precision("fp16", torch.device("cpu"))
    before = model.weight.detach().clone()
    with amp.autocast():
        loss = model(torch.randn(3, 4)).float().sum()
    amp.backward(loss)
    model.weight.grad[0, 0] = float("inf")
    amp.step(opt)  # one process: its own gradients, no agreement
    assert torch.equal(model.weight, before) and amp.skipped == 1 and amp.scaler.get_scale() == 2.0**15


def test_fp16_step_reads_nothing_back_to_the_host(monkeypatch):
    # No GPU here, so a host sync cannot be timed: every way a tensor reaches the host (.item(),
    # bool/int/float of a tensor, get_scale) is counted instead, on the CPU scaler (a mock of
    # the CUDA one, said so). A fused SGD takes the scale and the inf flag on the device, so
    # torch's own step reads nothing either: any read counted is Precision's.
    reads = []
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _n=name: reads.append(_n) or _real(t, *a))
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", lambda self: reads.append("get_scale") or 1.0)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    amp = Precision("fp16", torch.device("cpu"))
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # 2**16 overflows fp16 here at once
    for overflow in (False, True, False, True):
        opt.zero_grad(set_to_none=True)
        with amp.autocast():
            loss = model(torch.randn(3, 4)).float().sum()
        amp.backward(loss)
        if overflow:
            model.weight.grad[0, 0] = float("inf")
        reads.clear()
        amp.step(opt)
        assert reads == [], reads
    assert amp.skipped == 2 and reads == ["item"]  # the count: one read, when asked


def test_phase_clock_attributes_time_to_phases_on_the_cpu():
    clock = PhaseClock(torch.device("cpu"))
    clock.start()
    time.sleep(0.02)
    clock.lap("data")
    time.sleep(0.04)
    clock.lap("compute")
    time.sleep(0.02)
    clock.lap("data")
    phases = clock.read()
    assert phases["data"] == pytest.approx(0.04, abs=0.015) and phases["compute"] == pytest.approx(0.04, abs=0.015)


def test_block_transport_resolves_per_device_and_refuses_device_without_cuda_aware_mpi():
    for choice in ("auto", "host", "device"):  # host memory is the CPU's device memory
        assert resolve_block_transport(choice, torch.device("cpu"), aware=False) == "host"
    # A GPU is not needed to decide (no GPU here): the agreed answer is an argument.
    assert resolve_block_transport("auto", torch.device("cuda"), aware=False) == "host"
    with pytest.raises(HistError, match="CUDA-aware MPI"):
        resolve_block_transport("device", torch.device("cuda"), aware=False)
    assert resolve_block_transport("auto", torch.device("cuda"), aware=True) == "device"
    assert resolve_block_transport("host", torch.device("cuda"), aware=True) == "host"


def test_the_loaded_open_mpi_is_asked_at_run_time_whether_it_is_cuda_aware(monkeypatch):
    import subprocess
    import sys

    monkeypatch.delenv("HIST_CUDA_AWARE_MPI", raising=False)
    # In a fresh process, after MPI_Init: the libmpi mpi4py loaded, and its MPIX_Query_cuda_support.
    code = (
        "from mpi4py import MPI; from hist.comm import cuda_aware_mpi, loaded_mpi_library; "
        "print(loaded_mpi_library()); print(cuda_aware_mpi())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert "libmpi.so" in out[0]
    assert out[1] == "False"  # Debian's Open MPI is built without CUDA
    monkeypatch.setenv("HIST_CUDA_AWARE_MPI", "1")
    from hist.comm import cuda_aware_mpi

    assert cuda_aware_mpi() is True  # the override wins


def test_two_ranks_on_one_gpu_are_refused_unless_sharing_is_asked_for():
    from hist.launch import check_gpu_placement

    # (host, GPU) per rank, as the ranks gather them after MPI starts (no GPU here: the list
    # is what a 2-GPU node with 3 ranks would report; the gather itself runs in every MPI test).
    crowded = [("n1", "GPU-a"), ("n1", "GPU-b"), ("n1", "GPU-a"), ("n2", "GPU-a")]
    with pytest.raises(HistError, match=r"ranks 0, 2 share one GPU on n1: 3 ranks there on 2 GPU\(s\).*--share-gpus"):
        check_gpu_placement(crowded, share=False)
    check_gpu_placement(crowded, share=True)
    check_gpu_placement([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a")], share=False)  # one each
    check_gpu_placement([("n1", None), ("n1", None)], share=False)  # CPU ranks share nothing


def test_nccl_refuses_two_ranks_on_one_gpu_even_when_sharing_is_asked_for():
    from hist.launch import check_gpu_placement

    # (No GPU here: the list is what 2 ranks on a 1-GPU node would gather.) --share-gpus stands
    # for a Horovod without NCCL; with NCCL the first collective would fail "Duplicate GPU
    # detected" (horovod#3929), so the run ends first with one line that does not offer the flag.
    one_gpu = [("n1", "GPU-a"), ("n1", "GPU-a")]
    check_gpu_placement(one_gpu, share=True, nccl=False)
    with pytest.raises(HistError, match=r"ranks 0, 1 share one GPU on n1.*NCCL.*horovod#3929") as e:
        check_gpu_placement(one_gpu, share=True, nccl=True)
    assert "pass --share-gpus" not in str(e.value)
    check_gpu_placement([("n1", "GPU-a"), ("n1", "GPU-b")], share=True, nccl=True)  # one rank a GPU


def test_each_rank_takes_its_place_among_the_ranks_that_see_the_same_gpus():
    from hist.world import gpu_slot

    # srun --gpu-bind=closest, 8 tasks on a 2-socket 8-GPU node, cyclic distribution: the even
    # tasks see GPUs 0-3, the odd ones 4-7, each set numbered 0-3 in the task (the environment
    # srun would set; no GPU or Slurm binding here).
    views = [("n1", "0,1,2,3" if r % 2 == 0 else "4,5,6,7") for r in range(8)]
    physical = [views[r][1].split(",")[gpu_slot(views, r) % 4] for r in range(8)]
    assert sorted(physical) == [str(g) for g in range(8)]  # one task a GPU
    local_rank = [views[r][1].split(",")[r % 4] for r in range(8)]  # the old rule
    assert len(set(local_rank)) == 4  # two tasks on each of 4 GPUs, 4 GPUs idle
    # One view per host (no binding, or 2 nodes x 4): the local rank, as before.
    two_nodes = [(f"n{r // 4}", None) for r in range(8)]
    assert [gpu_slot(two_nodes, r) for r in range(8)] == [0, 1, 2, 3] * 2


def test_a_horovod_without_gpu_support_ends_a_cuda_run_before_any_collective():
    import subprocess
    import sys

    from hist.comm.synchroniser import horovod_gpu_problem

    assert horovod_gpu_problem(True) is None
    # The installed Horovod is this machine's CPU build (hvd.cuda_built() is False), exactly
    # what a GPU node without nvcc or NCCL used to get. A Synchroniser for a CUDA device (no GPU
    # here: the device is only named, never touched) must stop before Horovod starts.
    code = (
        "import torch; from hist.comm import Synchroniser; from hist.errors import HistError\n"
        "try:\n    Synchroniser(1, device=torch.device('cuda'))\n"
        "except HistError as e:\n    print('LINE', e)\n"
        "import horovod.torch as hvd; print('INIT', hvd.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "LINE the ranks train on CUDA devices but this Horovod was built without GPU support" in out, out
    assert "tools/bootstrap.sh" in out and "INIT False" in out
