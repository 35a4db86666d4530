"""hist's training step against the bare PyTorch step hist-bench compares it with: the same math."""

import copy

import torch

from hist.analysis.steps import bare_network, compare
from hist.comm import connect
from hist.config import Config
from hist.engine.clock import PhaseClock
from hist.engine.precision import Precision
from hist.engine.step import one_round_step
from hist.models import build_model, make_plan

CPU = torch.device("cpu")


def subnetwork_model():
    torch.manual_seed(0)
    model = build_model("preact_resnet18", 10, 0.125)
    model.layer3 = torch.nn.Sequential(*model.layer3, *[copy.deepcopy(model.layer3[1]) for _ in range(3)])
    model.set_subnetwork(make_plan(0, 0, len(model.partitioned_blocks()), 2).blocks[0])
    return model


def step_of(model, cfg):
    """hist-train's step (one process: its session trains the full model), then the subnetwork again."""
    active = [i for i, b in enumerate(model.partitioned_blocks()) if b.active]
    step = one_round_step(cfg, model, connect(1, 1), 0.05, Precision("fp32", CPU), PhaseClock(CPU))
    model.set_subnetwork(active)
    return step


def test_the_bare_network_is_the_active_subnetwork():
    model = subnetwork_model()
    bare = bare_network(model)
    active = [b for b in model.partitioned_blocks() if b.active]
    assert 0 < len(active) < len(model.partitioned_blocks())
    assert sum(isinstance(m, type(active[0])) for m in bare) == len(
        [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer if b.active]
    )
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(bare(x), model(x))


def test_hists_step_and_the_bare_step_move_the_weights_alike():
    model = subnetwork_model()
    twin = copy.deepcopy(model)
    cfg = Config(width=0.125, arch="preact_resnet18")
    step = step_of(model, cfg)
    step.set_lr(0.05)
    step.clock.start()
    bare = bare_network(twin)
    opt = torch.optim.SGD(bare.parameters(), lr=0.05, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = step(x, y)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(bare(x), y).backward()
        opt.step()
    assert not loss.requires_grad
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert set(step.clock.read()) == {"compute", "sync"}


def test_compare_reports_both_steps_and_their_ratio():
    model = subnetwork_model()
    cfg = Config(width=0.125, arch="preact_resnet18")
    step = step_of(model, cfg)
    step.set_lr(0.05)
    batches = lambda i: (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))  # noqa: E731
    out = compare(step, model, batches, pairs=3, warmup=1)
    assert out["hist_step_s"] > 0 and out["bare_step_s"] > 0 and out["pairs"] == 3
    assert 0.2 < out["bare_step_ratio"] < 5


def test_hist_bench_steps_refuses_a_width_list_it_cannot_read_in_one_line():
    from click.testing import CliRunner

    from hist.cli import bench

    result = CliRunner().invoke(bench, ["steps", "--widths", "0.0625,wide"])
    assert result.exit_code == 2 and "--widths '0.0625,wide': give channel multipliers" in result.output
    assert "Traceback" not in result.output


def test_on_a_cpu_the_layout_is_channels_last_unless_asked_otherwise():
    from hist.engine.precision import prefers_channels_last

    assert prefers_channels_last(CPU) is True
    assert prefers_channels_last(torch.device("cuda", 0)) is False  # no GPU here: the decision only


def test_hist_trains_sgd_to_the_bit_without_importing_dynamo():
    """hist-train's SGD is torch's update, bit for bit (momentum, weight decay, a state dict
    either way), and a process that steps it never imports torch._dynamo (1.5-2 s a rank)."""
    import subprocess
    import sys

    from hist.methods import SGD

    torch.manual_seed(0)
    model = build_model("preact_resnet18", 10, 0.0625)
    ours_model = copy.deepcopy(model)
    theirs = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ours = SGD(ours_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for step in range(4):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        for m, opt in ((model, theirs), (ours_model, ours)):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
        if step == 1:  # a checkpoint of either loads into the other
            ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ours_model.state_dict().values()))
    probe = (
        "import sys, torch; from hist.methods import SGD, skip_dynamo_wrappers; skip_dynamo_wrappers(); "
        "m = torch.nn.Linear(4, 2); o = SGD(m.parameters(), lr=0.1, momentum=0.9); m(torch.ones(3, 4)).sum().backward(); "
        "o.step(); o.zero_grad(); o.load_state_dict(o.state_dict()); print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
