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


def test_fp16_scaler_skips_an_overflowing_step_and_its_state_round_trips():
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

    class One:  # gather_state's collective, for one rank
        def allgather(self, obj):
            return [obj]

    states = amp.gather_state(One())
    again = Precision("fp16", torch.device("cpu"))
    again.load_state(states, 0)
    assert again.scaler.state_dict() == amp.scaler.state_dict()


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


def test_block_transport_resolves_per_device_and_refuses_device_without_cuda_aware_mpi(monkeypatch):
    for choice in ("auto", "host", "device"):  # host memory is the CPU's device memory
        assert resolve_block_transport(choice, torch.device("cpu")) == "host"
    # A GPU is not needed to decide: HIST_CUDA_AWARE_MPI stands in for what MPI reports.
    monkeypatch.setenv("HIST_CUDA_AWARE_MPI", "0")
    assert resolve_block_transport("auto", torch.device("cuda")) == "host"
    with pytest.raises(HistError, match="CUDA-aware MPI"):
        resolve_block_transport("device", torch.device("cuda"))
    monkeypatch.setenv("HIST_CUDA_AWARE_MPI", "1")
    assert resolve_block_transport("auto", torch.device("cuda")) == "device"
    assert resolve_block_transport("host", torch.device("cuda")) == "host"


def test_this_open_mpi_is_asked_whether_it_is_cuda_aware(monkeypatch):
    from hist.comm import cuda_aware_mpi

    monkeypatch.delenv("HIST_CUDA_AWARE_MPI", raising=False)
    assert cuda_aware_mpi() is False  # Debian's Open MPI is built without CUDA
