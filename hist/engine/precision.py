"""Mixed precision as one switch around the step: autocast for the forward pass, and for fp16
a gradient scaler whose skip decision is agreed by every rank that averages the gradients.

Parameters, optimizer state and every aggregation stay fp32; only activations and the
gradients' arithmetic inside the backward pass are in bf16/fp16.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """`--precision`: autocast context, (scaled) backward, and the optimizer step."""

    def __init__(self, kind: str, device: torch.device):
        self.kind, self.device = kind, device
        self.dtype = AUTOCAST_DTYPES[kind]
        # fp16's narrow range needs loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type) if kind == "fp16" else None
        self.skipped = 0  # steps skipped for inf/NaN gradients (fp16), this rank

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer, method=None) -> None:
        """The optimizer step through `method.step` (which knows Horovod's skip_synchronize);
        without a method, a plain step on this rank's own gradients (timing a step alone).

        With fp16, the ranks that averaged these gradients must skip the same steps or their
        weights part: each rank checks its own gradients, `method.agree_on_overflow` ORs the
        flag over those ranks, and a rank outside the overflow marks one of its gradients
        non-finite so that its scaler skips and backs off exactly like the others.
        """
        step = method.step if method is not None else (lambda step_fn: step_fn(optimizer))
        if self.scaler is None:
            step(lambda opt: opt.step())
            return
        agree = method.agree_on_overflow if method is not None else None
        if agree is not None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            local = not bool(torch.stack([g.isfinite().all() for g in grads]).all())
            if agree(local) and not local:
                grads[0].view(-1)[0] = float("inf")
        scale = self.scaler.get_scale()
        step(self.scaler.step)
        self.scaler.update()
        self.skipped += int(self.scaler.get_scale() < scale)

    def gather_state(self, sync) -> list[dict] | None:
        """Every rank's scaler state (they differ between subnetworks), for the checkpoint.
        Collective: every rank calls it."""
        if self.scaler is None:
            return None
        return sync.allgather(self.scaler.state_dict())

    def load_state(self, states: list[dict] | None, rank: int) -> None:
        if self.scaler is not None and states:
            self.scaler.load_state_dict(states[rank])
