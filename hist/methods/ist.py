"""Independent subnetwork training (ResIST)."""

from __future__ import annotations

import torch

from ..models import Plan, make_plan
from .balance import SpeedBalancer
from .base import Averaging


class IST(Averaging):
    """Independent subnetwork training: each subnetwork trains its share of layer3[1:].

    With `--warmup-local-sgd-epochs`, the first rounds are local SGD on the full model (the
    ResIST release needs this on ImageNet); IST starts at the first round after them.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.plan: Plan | None = None
        self.warm = False
        # --block-precision fp16/int8: what every rank holds of every travelling block tensor
        # (set at the first round, then at each full synchronisation): deliveries are packed
        # changes since it.
        self.packs_blocks = self.cfg.block_precision != "fp32"
        self.block_base: list[list[torch.Tensor]] | None = None
        subnets = self.sync.subnets
        self.balancer = (
            SpeedBalancer(self.model, len(self.blocks), subnets, self.sync.ranks_per_subnet)
            if self.cfg.balance == "speed" and subnets > 1
            else None
        )

    def plan_for(self, r: int) -> Plan:
        """Round r's plan: a pure function of the seed, the round and (`--balance speed`) the agreed counts."""
        counts = self.balancer.counts if self.balancer is not None else None
        return make_plan(self.cfg.seed, r, len(self.blocks), self.sync.subnets, self.cfg.min_depth, counts)

    def observe_round(self, steps: int, data_s, compute_s) -> None:
        if self.balancer is not None:
            blocks = self.blocks_per_subnet() or [len(self.blocks)] * self.sync.subnets  # warm-up: the full model
            self.balancer.observe(blocks, steps, data_s, compute_s)

    def travelling(self) -> list[list[torch.Tensor]]:
        """Per block, every tensor that travels with it (weights, then optimizer state)."""
        return [self.carried(ps, outer=True) for ps in self.blocks]

    @torch.no_grad()
    def rebase(self) -> None:
        """Every rank holds the same bits of every block now: the packed deliveries' reference."""
        if self.block_base is None:
            self.block_base = [[t.detach().clone() for t in ts] for ts in self.travelling()]
        else:
            for base, ts in zip(self.block_base, self.travelling()):
                for b, t in zip(base, ts):
                    b.copy_(t)

    def begin_round(self, r: int) -> None:
        super().begin_round(r)
        if self.packs_blocks and self.block_base is None:  # the first round: every rank holds one model
            self.rebase()
        self.warm = r < self.warm_rounds
        if self.warm:
            self.plan = None
            self.model.set_full()
        else:
            self.plan = self.plan_for(r)
            if r % self.cfg.plan_check_every == 0:
                self.sync.check_same(self.plan.digest, f"subnetwork plan of round {r}")
            self.model.set_subnetwork(self.plan.blocks[self.sync.subnet])
        if self.outer or self.sends_change:
            self.round_start(self.active_params())

    def my_blocks(self) -> list[int]:
        return list(self.plan.blocks[self.sync.subnet]) if self.plan is not None else list(range(len(self.blocks)))

    def active_params(self):
        return self.shared + [p for b in self.my_blocks() for p in self.blocks[b]]

    def after_backward(self) -> None:
        self.sync.average_gradients(self.active_params())

    def end_round(self, r: int, full: bool, stop_only: bool = False) -> None:
        if self.warm:  # local SGD: afterwards every rank holds the whole model
            self.average_everything()
            if self.packs_blocks:
                self.rebase()
            return
        # The shared parameters' allreduce (Horovod) starts first; with --overlap the block
        # transfers (MPI) run while it is in flight, and both are waited for at the end.
        # Blocks in device memory go to a CUDA-aware MPI: never while NCCL (Horovod) works on
        # the same GPUs, so there the shared average completes first.
        overlap = self.cfg.overlap and self.sync.block_transport != "device"
        shared = self.start_shared_average()
        if not overlap:
            shared.wait()
        # Packed deliveries go to the next plan's holders even before a full synchronisation, so
        # that they keep the bits an uninterrupted run keeps; the others then get copies of them.
        next_plan = None if full and not self.packs_blocks else self.plan_for(r + 1)
        packing = {"precision": self.cfg.block_precision, "references": self.block_base} if self.packs_blocks else {}
        travelling = self.travelling()
        if self.outer:  # average among holders, step, then deliver the stepped block
            self.sync.sync_blocks(travelling, self.plan, next_plan, self.cfg.aggregate, kinds=("allreduce",))
            self.outer_step([p for b in self.my_blocks() for p in self.blocks[b]])
            blocks = self.sync.sync_blocks(
                travelling, self.plan, next_plan, self.cfg.aggregate, kinds=("bcast",), nonblocking=overlap, **packing
            )
        else:
            blocks = self.sync.sync_blocks(
                travelling, self.plan, next_plan, self.cfg.aggregate, nonblocking=overlap, **packing
            )
        shared.wait()
        blocks.wait()
        if self.outer:
            self.outer_step(self.shared)
        if self.packs_blocks and full:
            self.sync.sync_blocks(travelling, self.plan, None, self.cfg.aggregate, kinds=("bcast",))
            if not stop_only:  # a run resumed from a stop goes on from the base it had
                self.rebase()

    def start_shared_average(self):
        """Start averaging the shared parameters (and their momentum) over every rank."""
        return self.start_average(self.shared, "shared")

    def blocks_per_subnet(self) -> list[int] | None:
        return None if self.plan is None else [len(b) for b in self.plan.blocks]

    def eval_scale(self) -> float:
        # Each block trained in a fraction p of the subnetworks; scaling its residual branch by p
        # keeps the full network's activations at the size the subnetworks were trained with.
        # (Group sizes, hence p, are the same every round.) After local-SGD warm-up rounds the
        # full network was trained as it is evaluated.
        # Uneven counts (--balance speed) keep it at 1/S without overlap: see Plan.keep_fraction.
        if self.sync.subnets == 1 or self.warm:
            return 1.0
        return (self.plan or self.plan_for(0)).keep_fraction()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.balancer is not None:
            state["balance"] = self.balancer.state_dict()
        if self.block_base is not None:  # the same on every rank
            state["block_base"] = self.block_base
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.packs_blocks and state.get("block_base") is not None:
            device = self.params[0].device
            self.block_base = [[t.to(device).clone() for t in ts] for ts in state["block_base"]]
        if self.balancer is not None and state.get("balance") is not None:
            self.balancer.load_state_dict(state["balance"])
