"""Mixed precision as one switch around the step: autocast for the forward pass, and for fp16
a gradient scaler deciding on the averaged gradients, hence alike on the ranks that average them.

Parameters, optimizer state and every aggregation stay fp32; only activations and the
gradients' arithmetic inside the backward pass are in bf16/fp16.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import HistError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_supported(kind: str, device: torch.device) -> None:
    """bf16 on a GPU older than Ampere fails at the first forward pass: say so before training."""
    if kind == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability(device)
        raise HistError(
            f"--precision bf16 needs an Ampere or newer GPU; {torch.cuda.get_device_name(device)} has compute "
            f"capability {major}.{minor}; use --precision fp16 (with its loss scaling) or fp32"
        )


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo), empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def precision_supported(precision: str, device: torch.device) -> str | None:
    """Why `device` has no fast path for `precision` (None: it has one, so it is measured).
    bf16 needs Ampere or newer on a GPU, AVX-512 BF16 or AMX on a CPU; CPUs emulate fp16."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return None if precision == "fp16" or torch.cuda.is_bf16_supported() else "bf16 needs an Ampere or newer GPU"
    if precision == "fp16":
        return "no fp16 fast path on a CPU"
    return None if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "no bf16 fast path on this CPU (AVX-512 BF16, AMX)"


def prefers_channels_last(device: torch.device) -> bool:
    """The memory layout `--channels-last` leaves to the device: NHWC on a CPU, where oneDNN's
    convolutions take 0.67x the step of NCHW for IST's ResNet-101 subnetwork at width 1/16,
    0.81x at 1/4 and 0.99x at 1 (docs/performance.md); NCHW on a GPU until it is measured there."""
    return device.type == "cpu"


class Precision:
    """`--precision`: autocast context, (scaled) backward, and the optimizer step."""

    def __init__(self, kind: str, device: torch.device):
        self.kind, self.device = kind, device
        self.dtype = AUTOCAST_DTYPES[kind]
        # fp16's narrow range needs loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type) if kind == "fp16" else None
        # Steps skipped for inf/NaN gradients (fp16), this rank, counted on the device: a host
        # read per step would make the host wait for the step before it queues the next one.
        self._skips = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def skipped(self) -> int:
        """Steps skipped so far (fp16), this rank. One host read: ask per round or at the end."""
        return int(self._skips.item())

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer, step_through=None) -> None:
        """The optimizer step through `step_through(step_fn)` (the session's, which knows Horovod's
        skip_synchronize); without it, a plain step on this rank's own gradients (timing a step alone).

        With fp16, ranks that average their gradients need no agreement of their own on
        skipping a step: the scaler decides on the averaged gradients, which are the same on
        each of those ranks, so an overflow on any of them is an overflow on all (an inf or
        NaN survives the average). No host read or allreduce is added for it: a skip is the
        scale falling in `update()`, compared on the device (`get_scale()` is a host read).
        """
        step = step_through if step_through is not None else (lambda step_fn: step_fn(optimizer))
        if self.scaler is None:
            step(lambda opt: opt.step())
            return
        before = self.scaler._get_scale_async().clone()  # the scale tensor (set by backward's scale())
        step(self.scaler.step)
        self.scaler.update()
        self._skips += self.scaler._get_scale_async() < before
