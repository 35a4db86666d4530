"""hist.IST and hist.LocalSGD in a loop of the test's own: the round logic in one process (and in
a two-subnetwork world whose other rank is imagined), a model hist has never seen trained at 2
ranks under horovodrun and under torchrun (every rank ends with the same weights, the loss
falls, a resume is exact), and the one line each bad input gets.

Run as a script (`python tests/test_api.py worker OUT`), this file is the ranks' program."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hist
from hist.comm import LocalSynchroniser
from hist.errors import ArgumentTypeError, BlockError, HistError, OptionError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import BIN, horovodrun, torchrun  # noqa: E402


# ------------------------------------------------------------ a model hist has never seen
class Residual(nn.Module):
    """x + f(x), with a BatchNorm inside (its running statistics travel with the block)."""

    def __init__(self, d):
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm1d(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, x):
        return x + self.f(x)


class TinyNet(nn.Module):
    def __init__(self, d=16, n=4, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, d), nn.BatchNorm1d(d))
        self.body = nn.ModuleList(Residual(d) for _ in range(n))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.body:
            x = block(x)
        return self.head(x)


def batch(rank: int, step: int, n: int = 32):
    """A learnable 3-class problem; each rank draws its own batches."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def build(opt="sgd", seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    return model, optimizer


def train(model, optimizer, rank, first, last, scaler=None, autocast=False, overflow=0):
    """The user's loop; `overflow`: the first steps' gradients are made infinite (the scaler skips them)."""
    losses = []
    for step in range(first, last):
        x, y = batch(rank, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        if step - first < overflow:
            loss = loss * float("inf")
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def detached(state):
    return copy.deepcopy(state)


def two_subnets():
    """A world of two subnetworks seen from rank 0, whose other rank is imagined (every
    collective an identity): the plans, switches and cuts run as at 2 ranks, in-process."""
    return LocalSynchroniser(subnets=2, size=2)


# ------------------------------------------------------------ the ranks' program
def worker(out: Path, subnets: int = 0) -> None:
    from hist.world import world_info_from_env

    torch.set_num_threads(1)
    rank = world_info_from_env().rank
    results = {}
    # IST, SGD with momentum aggregated: 24 steps in rounds of 4, a state saved mid-round at 10
    model, optimizer = build(seed=rank)  # different on each rank: the start is rank 0's
    ist = hist.IST(model, model.body, optimizer, local_iters=4, subnets=subnets)
    plans = []
    losses = train(model, optimizer, rank, 0, 10)
    saved = detached(ist.state_dict())
    for first in range(10, 24, 2):
        plans.append((ist.round, ist.active_blocks))
        losses += train(model, optimizer, rank, first, first + 2)
    final = detached(ist.state_dict())
    with ist.full_model():
        x, y = batch(99, 0, 512)
        results["accuracy"] = (model(x).argmax(1) == y).float().mean().item()
    results.update(
        engine=ist.engine, losses=losses, plans=plans, final=final["model"], size=ist.size, subnet=ist.subnet
    )
    # the same run resumed from the state saved at step 10, in a fresh model and optimizer
    model, optimizer = build(seed=7)
    ist2 = hist.IST(model, model.body, optimizer, local_iters=4, subnets=subnets)
    ist2.load_state_dict(saved)
    train(model, optimizer, rank, 10, 24)
    results["resumed"] = ist2.state_dict()["model"]
    # AdamW, its state aggregated, under autocast with a GradScaler (not passed: found) that skips the first steps
    model, optimizer = build("adamw", seed=rank)
    scaler = torch.amp.GradScaler("cpu")
    ist3 = hist.IST(model, [f"body.{i}" for i in range(4)], optimizer, local_iters=3, subnets=subnets)
    train(model, optimizer, rank, 0, 13, scaler=scaler, autocast=True, overflow=1 + rank)  # rank 1 skips 2 steps
    results["adamw"] = (ist3.state_dict()["model"], ist3.step, ist3.round)
    # IST with every compressed kind of traffic: the shared change in int4, top-k with error
    # feedback, the blocks delivered in int8; saved mid-round at 10 and resumed
    packed = dict(local_iters=4, subnets=subnets, shared_precision="int4", shared_topk=0.25, block_precision="int8")
    model, optimizer = build(seed=rank)
    ist4 = hist.IST(model, model.body, optimizer, **packed)
    train(model, optimizer, rank, 0, 10)
    saved = detached(ist4.state_dict())
    train(model, optimizer, rank, 10, 22)
    results["packed"] = detached(ist4.state_dict())["model"]
    model, optimizer = build(seed=7)
    ist5 = hist.IST(model, model.body, optimizer, **packed)
    ist5.load_state_dict(saved)
    train(model, optimizer, rank, 10, 22)
    results["packed_resumed"] = ist5.state_dict()["model"]
    # local SGD with the same contract
    model, optimizer = build(seed=rank)
    local = hist.LocalSGD(model, optimizer, local_iters=5, optimizer_state="restart")
    train(model, optimizer, rank, 0, 12)
    with local.full_model():
        results["local"] = detached(model.state_dict())
    torch.save(results, out / f"rank{rank}.pt")


def _floats(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _check_ranks(out: Path, engine: str, n: int = 2) -> None:
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(n)]
    r0 = ranks[0]
    assert {r["engine"] for r in ranks} == {engine} and r0["size"] == n
    for r in ranks[1:]:
        for key in ("final", "resumed", "local", "packed", "packed_resumed"):
            a, b = _floats(r0[key]), _floats(r[key])
            assert all(torch.equal(a[k], b[k]) for k in a), f"{key}: the ranks' weights differ"
        a, b = _floats(r0["adamw"][0]), _floats(r["adamw"][0])
        assert all(torch.equal(a[k], b[k]) for k in a), "adamw: the ranks' weights differ"
        assert r["adamw"][1:] == r0["adamw"][1:] == (13, 4)  # skipped steps counted alike on every rank
    # the resumed run is the run, to the last bit
    assert all(torch.equal(r0["final"][k], r0["resumed"][k]) for k in r0["final"])
    assert all(torch.equal(r0["packed"][k], r0["packed_resumed"][k]) for k in r0["packed"])
    # the subnetworks split the blocks: in each round, disjoint blocks (the same within a subnetwork)
    by_subnet = {r["subnet"]: r["plans"] for r in ranks}
    assert len(by_subnet) == 2 and all(r["plans"] == by_subnet[r["subnet"]] for r in ranks)
    for (ra, a), (rb, b) in zip(by_subnet[0], by_subnet[1]):
        assert ra == rb and not set(a) & set(b) and len(a) + len(b) == 4
    for r in ranks:
        first, last = sum(r["losses"][:4]) / 4, sum(r["losses"][-4:]) / 4
        assert last < 0.8 * first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    assert r0["accuracy"] > 0.6


@pytest.mark.multiprocess
def test_two_ranks_under_horovodrun(tmp_path):
    horovodrun(2, BIN / "python", Path(__file__), "worker", tmp_path, timeout=300)
    _check_ranks(tmp_path, "horovod")


@pytest.mark.multiprocess
def test_two_ranks_under_torchrun(tmp_path):
    torchrun(2, BIN / "python", Path(__file__), "worker", tmp_path, timeout=300)
    _check_ranks(tmp_path, "torch")


@pytest.mark.multiprocess
def test_two_subnetworks_of_two_ranks_under_torchrun(tmp_path):
    """Four ranks: a subnetwork's two ranks average their gradients every step (before the
    scaler looks for infinities, so they skip together though each overflows at its own step)."""
    torchrun(4, BIN / "python", Path(__file__), "worker", tmp_path, 2, timeout=300)
    _check_ranks(tmp_path, "torch", 4)


# ------------------------------------------------------------ the round logic, in-process
def test_import_hist_is_cheap():
    code = "import hist, sys; assert not [m for m in sys.modules if m.startswith(('torch', 'horovod', 'mpi4py'))]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rounds_follow_the_optimizer_in_one_process():
    model, optimizer = build()
    ist = hist.IST(model, model.body, optimizer, local_iters=3)
    assert (ist.engine, ist.size, ist.subnets, ist.eval_scale) == ("local", 1, 1, 1.0)
    train(model, optimizer, 0, 0, 7)
    assert (ist.step, ist.round, ist.round_end) == (7, 2, 9)
    names = [n for n, _ in model.named_parameters()]
    assert list(model.state_dict()) == list(TinyNet().state_dict())  # keys untouched by the switches
    with ist.full_model():
        assert ist.active_blocks == [0, 1, 2, 3]
    ist.close()
    assert "forward" not in model.body[0].__dict__ and names == [n for n, _ in model.named_parameters()]


def test_round_schedules():
    model, optimizer = build()
    ist = hist.IST(model, model.body, optimizer, local_iters=4, round_schedule="post-local", post_local_steps=3)
    ends = []
    for step in range(12):
        train(model, optimizer, 0, step, step + 1)
        ends.append(ist.round_end)
    assert ends == [2, 3, 7, 7, 7, 7, 11, 11, 11, 11, 15, 15]
    model, optimizer = build()
    for group in optimizer.param_groups:
        group["lr"] = 0.01
    ist = hist.IST(model, model.body, optimizer, local_iters=4, round_schedule="qsr", qsr_alpha=0.05)
    assert ist.round_end == 25  # (0.05 / 0.01)^2


def test_a_subnetwork_trains_only_its_blocks():
    model, optimizer = build()
    ist = hist.IST(model, model.body, optimizer, local_iters=4, sync=two_subnets())
    assert len(ist.active_blocks) == 2 and ist.eval_scale == 0.5
    for step in range(4):
        inactive = [i for i in range(4) if i not in ist.active_blocks]
        before = {i: [p.detach().clone() for p in model.body[i].parameters()] for i in inactive}
        train(model, optimizer, 0, step, step + 1)
        optimizer.zero_grad(set_to_none=False)  # zeros, not None: momentum must still leave them alone
        for i in inactive:
            assert all(torch.equal(a, b) for a, b in zip(before[i], model.body[i].parameters()))
    plans = set()
    for r in range(6):
        plans.add(tuple(ist.active_blocks))
        train(model, optimizer, 0, 4 * r + 4, 4 * r + 8)
    assert len(plans) > 1, "the plan never changed"


def test_full_model_scales_and_restores():
    model, optimizer = build()
    ist = hist.IST(model, model.body, optimizer, local_iters=4, sync=two_subnets())
    train(model, optimizer, 0, 0, 2)  # mid-round
    active, x = ist.active_blocks, torch.randn(32, 16)
    model.train()
    with ist.full_model() as full:
        assert full is model and ist.active_blocks == [0, 1, 2, 3]
        model.eval()
        with torch.no_grad():
            out = model.body[0](x)
            f = model.body[0].f(x)
        assert torch.allclose(out, x + 0.5 * f, atol=1e-6)
    assert model.training and ist.active_blocks == active  # the rest of the round trains the same blocks
    assert (ist.step, ist.round, ist.round_end) == (2, 0, 4)


@pytest.mark.parametrize(
    "opt,state", [("sgd", "average"), ("sgd", "restart"), ("adamw", "average"), ("adamw", "restart")]
)
def test_state_dict_resumes_exactly(opt, state):
    def run(resume=None):
        model, optimizer = build(opt, seed=0 if resume is None else 5)
        ist = hist.IST(model, model.body, optimizer, local_iters=3, optimizer_state=state, sync=two_subnets())
        if resume is None:
            train(model, optimizer, 0, 0, 5)
            saved = detached(ist.state_dict())
        else:
            ist.load_state_dict(resume)
            saved = None
        train(model, optimizer, 0, 5, 14)
        return detached(ist.state_dict()), saved

    straight, saved = run()
    resumed, _ = run(saved)
    for part in ("model", "optimizer"):
        a, b = straight[part], resumed[part]
        flat_a, flat_b = torch.utils._pytree.tree_flatten(a)[0], torch.utils._pytree.tree_flatten(b)[0]
        assert len(flat_a) == len(flat_b)
        for u, v in zip(flat_a, flat_b):
            assert torch.equal(u, v) if torch.is_tensor(u) else u == v
    assert straight["hist"]["step"] == resumed["hist"]["step"] == 14


@pytest.mark.parametrize("passed", [True, False], ids=["scaler-passed", "scaler-found"])
def test_a_skipped_step_still_counts_with_the_scaler(passed):
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu")
    ist = hist.IST(model, model.body, optimizer, local_iters=3, scaler=scaler if passed else None, sync=two_subnets())
    steps = []
    optimizer.register_step_post_hook(lambda *a: steps.append(1))
    train(model, optimizer, 0, 0, 7, scaler=scaler, overflow=2)
    assert len(steps) == 5 and (ist.step, ist.round) == (7, 2) and ist.scaler is scaler
    state = ist.state_dict()["hist"]["scaler"]
    assert state[0]["scale"] == scaler.get_scale() < 65536.0


def test_local_sgd_in_one_process():
    model, optimizer = build()
    local = hist.LocalSGD(model, optimizer, local_iters=2)
    losses = train(model, optimizer, 0, 0, 30)
    assert (local.step, local.round) == (30, 15) and sum(losses[-5:]) < sum(losses[:5])


# ------------------------------------------------------------ bad input: one line naming the module
class Widening(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)

    def forward(self, x):
        return self.up(x)


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and isinstance(excinfo.value, HistError), message
    for w in words:
        assert w in message, message


def test_bad_blocks_get_one_line():
    model, optimizer = build()
    with pytest.raises(BlockError) as e:
        hist.IST(model, [], optimizer)
    _one_line(e, "no blocks")
    with pytest.raises(ValueError) as e:
        hist.IST(model, [model.body[0], model.body[1], model.body[0]], optimizer)
    _one_line(e, "blocks[2]", "body.0", "listed twice")
    with pytest.raises(ValueError) as e:
        hist.IST(model, [model.body[0], model.body[0].f], optimizer)
    _one_line(e, "body.0.f", "nested inside", "body.0")
    stranger = Residual(16)
    with pytest.raises(ValueError) as e:
        hist.IST(model, [model.body[0], stranger], optimizer)
    _one_line(e, "blocks[1]", "Residual", "not part of the model")
    with pytest.raises(ValueError) as e:
        hist.IST(model, ["body.0", "body.9"], optimizer)
    _one_line(e, "body.9", "not a module")
    with pytest.raises(ValueError) as e:
        hist.IST(model, model.body, optimizer, subnets=5)
    _one_line(e, "5 subnetworks", "4 blocks", "TinyNet")
    with pytest.raises(ValueError) as e:
        hist.IST(model, model.body[:1], optimizer, sync=two_subnets())
    _one_line(e, "2 subnetworks (one per process)", "1 block")
    with pytest.raises(TypeError) as e:
        hist.IST(model, [model.body[0], 3], optimizer)
    _one_line(e, "blocks[1]", "int")


def test_a_block_that_changes_the_shape_is_named_at_the_first_forward():
    model, optimizer = build()
    model.body[2] = Widening()
    model.head = nn.Linear(32, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ist = hist.IST(model, model.body, optimizer, local_iters=2, sync=two_subnets())
    assert 2 not in ist.active_blocks or True
    with pytest.raises(BlockError) as e:
        model(batch(0, 0)[0])
    _one_line(e, "blocks[2]", "body.2, Widening", "(32, 32)", "(32, 16)")


def test_bad_options_get_one_line():
    model, optimizer = build()
    for kwargs, words in [
        ({"local_iters": 0}, "local_iters=0"),
        ({"aggregate": "mean"}, "aggregate='mean'"),
        ({"optimizer_state": "keep"}, "optimizer_state='keep'"),
        ({"outer_momentum": 1.0}, "outer_momentum=1.0"),
        ({"balance": "speed"}, "balance='speed'"),
        ({"round_schedule": "post-local"}, "post_local_steps"),
        ({"min_depth": 9}, "min_depth=9"),
        ({"min_depth": -1}, "min_depth=-1"),
        ({"shared_topk": 1.0}, "shared_topk=1.0"),
        ({"block_precision": "int4"}, "block_precision='int4'"),
        ({"block_precision": "int8", "aggregate": "average"}, "aggregate='copy'"),
    ]:
        with pytest.raises(OptionError) as e:
            hist.IST(model, model.body, optimizer, **kwargs)
        _one_line(e, "hist.IST", words)
    with pytest.raises(ArgumentTypeError) as e:
        hist.IST(model, model.body, torch.optim.RMSprop(model.parameters()))
    _one_line(e, "RMSprop", "optimizer_state='restart'")
    with pytest.raises(ValueError) as e:
        hist.IST(model, model.body, torch.optim.SGD(TinyNet().parameters(), lr=0.1))
    _one_line(e, "not a parameter of the model")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(Path(sys.argv[2]), *map(int, sys.argv[3:]))
