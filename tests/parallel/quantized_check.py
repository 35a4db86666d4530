"""Run under mpirun (Horovod + MPI) or torchrun (torch.distributed, Gloo): compressed rounds
through hist's own classes, checked on real ranks.

Arguments: ENGINE SPEC [SPEC ...], ENGINE horovod or torch, each SPEC
METHOD,SHARED_PRECISION,TOPK,BLOCK_PRECISION. Each rank trains two rounds on its own random
data (the second ends in a full synchronisation), then:
- every rank holds the same bits of the shared parameters and their momentum (local SGD: of the
  whole model), and after the full synchronisation of the whole model and momentum;
- the residuals carry what was not sent: the change applied plus the residuals left equals the
  ranks' mean change plus the residuals before (error feedback loses nothing);
- the bytes counted are the bytes handed to the collectives, and what `traffic` predicts;
- IST blocks: every rank that trains a block next holds the same bits of it as its sender.
Prints one OK line per rank and SPEC.
"""

import sys

import numpy as np
import torch

from hist.comm import connect
from hist.comm.traffic import compressed_average_bytes, topk_per_chunk
from hist.config import Config
from hist.methods import IST, LocalSGD
from hist.models import build_model

torch.set_num_threads(1)


def flat(tensors) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors]).numpy().copy()


def check(sync, spec: str) -> None:
    method, precision, topk, block_precision = spec.split(",")
    cfg = Config(
        arch="preact_resnet34",
        width=0.0625,
        method=method,
        local_iters=2,
        seed=5,
        lr=0.05,
        shared_precision=precision,
        shared_topk=float(topk),
        block_precision=block_precision,
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, 10, cfg.width)
    sync.broadcast_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    m = (IST if method == "ist" else LocalSGD)(model, sync, cfg, opt)
    averaged = m.shared if method == "ist" else m.params
    name = "shared" if method == "ist" else "all"
    handed = {"bytes": 0, "counted": 0.0}
    for kind in ("alltoall", "allgather"):  # what the codec hands the real collectives, and what they count
        real = getattr(sync, f"{kind}_bytes")

        def spy(buf, real=real, kind=kind):
            before = sync.traffic.sent
            out = real(buf)
            handed["counted"] += sync.traffic.sent - before
            each = buf.numel() // sync.size if kind == "alltoall" else buf.numel()
            handed["bytes"] += (sync.size - 1) * each  # every part but its own leaves this rank
            return out

        setattr(sync, f"{kind}_bytes", spy)
    n_ranks = sync.size

    def residuals():
        c = m.compressors.get(name)
        if c is None or c.residual is None:
            return 0.0, 0.0
        shards = sync.allgather(c.shard_residual.numpy().copy())
        return np.mean(sync.allgather(c.residual.numpy().copy()), axis=0), np.concatenate(shards)

    for r, full in ((0, False), (1, True)):
        m.begin_round(r)
        gen = torch.Generator().manual_seed(100 * r + sync.rank)
        for _ in range(cfg.local_iters):
            x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            m.after_backward()
            m.step()
        tensors = m.carried(averaged, outer=False)
        change = flat(tensors) - flat([m.starts[t] for t in tensors])
        mean_change = np.mean(sync.allgather(change), axis=0)
        e_before, f_before = residuals()
        handed.update(bytes=0, counted=0.0)
        blocks_before = [flat(ts) for ts in m.travelling()] if method == "ist" else []
        m.end_round(r, full=full)
        if method == "ist" and block_precision != "fp32":
            check_blocks(sync, m, r, blocks_before)
        mine = flat(tensors)
        assert all(np.array_equal(mine, o) for o in sync.allgather(mine)), "averaged tensors differ between ranks"
        applied = mine - flat([m.starts[t] for t in tensors])
        e_after, f_after = residuals()
        n = change.size
        lhs = np.zeros(np.size(e_after) if np.size(e_after) > 1 else n)
        lhs[:n] += applied
        lhs += e_after + f_after
        rhs = np.zeros_like(lhs)
        rhs[:n] += mean_change
        rhs += e_before + f_before
        np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-5)
        assert np.abs(e_after).sum() > 0  # something was held back: the check above is not vacuous
        k = topk_per_chunk(cfg.shared_topk)
        expected = compressed_average_bytes(n, precision, k, n_ranks) / n_ranks
        assert handed["bytes"] == handed["counted"] == expected, (handed, expected)
    state = flat(list(model.parameters()))
    assert all(np.array_equal(state, o) for o in sync.allgather(state)), "models differ after full sync"
    momentum = flat([opt.state[p]["momentum_buffer"] for p in model.parameters()])
    assert all(np.array_equal(momentum, o) for o in sync.allgather(momentum)), "momentum differs after full sync"
    print(f"OK rank {sync.rank} {spec}", flush=True)


def check_blocks(sync, m, r, before) -> None:
    """The owner and every rank that trains a block next hold the same bits of it (weights and
    momentum), which are not the owner's own: they were packed."""
    plan, nxt = m.plan, m.plan_for(r + 1)
    everyone = sync.allgather([flat(ts) for ts in m.travelling()])
    moved = 0
    for b in range(plan.n_blocks):
        holders = {plan.owner[b], *nxt.holders(b)}  # one rank a subnetwork here
        values = [everyone[s][b] for s in holders]
        assert all(np.array_equal(values[0], v) for v in values), (r, b, holders)
        if nxt.holders(b) != (plan.owner[b],):
            moved += 1
            if sync.rank == plan.owner[b]:
                assert not np.array_equal(before[b], everyone[sync.rank][b]), "the owner kept unpacked bits"
    assert moved > 0


engine = sys.argv[1]
sync = connect(2, 2, engine)
for spec in sys.argv[2:]:
    try:
        check(sync, spec)
    except Exception:
        print(f"FAILED rank {sync.rank}: {spec}", flush=True)
        raise
