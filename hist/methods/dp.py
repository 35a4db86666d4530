"""Synchronous data parallel (Horovod's DistributedOptimizer), the baseline."""

from __future__ import annotations

from .base import Method


class DataParallel(Method):
    """Horovod synchronous data parallel: gradients averaged over all ranks every step."""

    def __init__(self, model, sync, cfg, optimizer, warm_rounds=0):
        super().__init__(model, sync, cfg, sync.distributed_optimizer(optimizer, model), warm_rounds)

    def after_backward(self) -> None:
        # Horovod: wait for the allreduces started during backward; the wait is the sync time.
        self.optimizer.synchronize()
        self.sync.traffic.allreduce(sum(p.numel() * p.element_size() for p in self.model.parameters()), self.sync.size)

    def step(self, step_fn=None) -> None:
        # Horovod: the gradients are already averaged (synchronize above, before any unscaling).
        with self.optimizer.skip_synchronize():
            super().step(step_fn)
