"""Compressed communication (issue 42): the codec in process, then real ranks under Horovod +
MPI and torch.distributed (Gloo): the same bits on every rank (shared averages and packed block
deliveries), error feedback that loses nothing, the bytes counted being the bytes sent, exact
resume, and one line for a bad option."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hist.comm import LocalSynchroniser, round_bytes
from hist.comm.quantized import Codec, CompressedAverage
from hist.comm.traffic import CHUNK, codec_nbytes, compressed_average_bytes, topk_per_chunk
from hist.models import build_model, make_plan, shared_and_partitioned

from helpers import BIN, TINY_RUN, check_recorded, hist_train, mpirun, torchrun

CHECK = Path(__file__).parent / "parallel" / "quantized_check.py"
KINDS = [(p, t) for p in ("fp32", "fp16", "int8", "int4") for t in (0.0, 0.01, 0.3)]


@pytest.mark.parametrize("precision,topk", KINDS)
def test_the_codec_packs_to_its_counted_size_and_decodes_what_the_sender_kept(precision, topk):
    torch.manual_seed(0)
    v = torch.randn(CHUNK * 12) * torch.logspace(-4, 0, CHUNK * 12)  # magnitudes over four decades
    codec = Codec(precision, topk)
    packed, kept = codec.encode(v)
    assert packed.dtype == torch.uint8 and packed.numel() == codec_nbytes(v.numel(), precision, codec.k)
    assert torch.equal(codec.decode(packed, v.numel()), kept)  # the receiver decodes the sender's bits
    if topk:  # k values a chunk, the largest
        nonzero = (kept.view(-1, CHUNK) != 0).sum(dim=1)
        assert (nonzero <= topk_per_chunk(topk)).all()
    if precision == "fp32" and not topk:
        assert torch.equal(kept, v)
    if precision in ("int8", "int4") and not topk:  # per-chunk scales: within half a step of each chunk's
        step = v.view(-1, CHUNK).abs().amax(dim=1, keepdim=True) / {"int8": 127, "int4": 7}[precision]
        assert ((kept - v).view(-1, CHUNK).abs() <= 0.51 * step).all()


def test_int4_puts_two_values_in_a_byte():
    n = CHUNK * 8
    assert codec_nbytes(n, "int4") == n // 2 + 2 * 8  # values, then a bf16 scale a chunk
    assert codec_nbytes(n, "int8") == n + 2 * 8
    assert codec_nbytes(n, "int4", 3) == 8 * 3 + 8 * 2 + 12  # positions, scales, 24 values in 12 bytes
    codec = Codec("int4")
    packed, kept = codec.encode(torch.linspace(-1, 1, n))
    assert packed.numel() == n // 2 + 16 and len(set(kept.tolist())) > 8  # all 15 levels used


def test_error_feedback_carries_what_was_not_sent():
    """On one rank the average is the rank's own change: over rounds, what was applied plus the
    residuals left equals every change made, to rounding."""
    torch.manual_seed(1)
    sync = LocalSynchroniser()
    p = torch.zeros(CHUNK * 4 + 7)  # not a multiple of a chunk: padded
    avg = CompressedAverage("int4", 0.02)
    total = torch.zeros_like(p)
    for _ in range(6):
        ref = p.clone()
        step = torch.randn_like(p) * 0.01
        total += step
        p += step
        avg.average(sync, [p], [ref])
        assert avg.residual.abs().sum() > 0  # top-k at 2% leaves most of each change behind
        carried = avg.residual[: p.numel()] + avg.shard_residual[: p.numel()]
        torch.testing.assert_close(p + carried, total, rtol=0, atol=1e-6)
    assert (p != 0).sum() > 0.02 * p.numel()  # residuals grew until they were sent


def test_bytes_of_the_two_collectives_against_a_ring_allreduce():
    n = 10**6
    fp32_ring = 2 * (8 - 1) * 4 * n  # all ranks, fp32 ring allreduce at 8
    int4 = compressed_average_bytes(n, "int4", CHUNK, 8)
    assert int4 == pytest.approx(fp32_ring * (0.5 + 2 / CHUNK) / 4, rel=0.01)  # 2(N-1) of the packed size
    # top-k at 1% (3 of 256): 1.5 bytes of values a chunk, 3 of positions, 2 of scale
    assert compressed_average_bytes(n, "int4", topk_per_chunk(0.01), 8) == pytest.approx(
        fp32_ring * 6.5 / 1024, rel=0.01
    )


def parallel(launcher, engine, *specs):
    if launcher is mpirun:
        return mpirun(2, BIN / "python", CHECK, engine, *specs, timeout=300).stdout
    return torchrun(2, BIN / "python", CHECK, engine, *specs, timeout=300).stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "launcher,engine,specs",
    [
        (mpirun, "horovod", ["ist,int4,0.05,int8", "ist,int8,0,fp16", "local-sgd,int4,0,fp32"]),
        (torchrun, "torch", ["ist,int4,0,int8", "local-sgd,fp32,0.02,fp32"]),
    ],
)
def test_real_ranks_hold_the_same_bits_and_lose_nothing(launcher, engine, specs):
    out = parallel(launcher, engine, *specs)
    assert all(out.count(f"OK rank {r} {s}") == 1 for r in (0, 1) for s in specs), out


def counted_bytes(n_rounds, precision, topk, block_precision):
    """hist-bench's bytes per round (`round_bytes`) of the tiny model at 2 ranks, momentum averaged,
    each round synchronised towards the next plan."""
    shared, blocks = shared_and_partitioned(build_model("preact_resnet34", 10, 0.0625))
    shared_b = 2 * 4 * sum(p.numel() for p in shared)  # the weights and their momentum
    block_b = [2 * 4 * sum(p.numel() for p in ps) for ps in blocks]
    plans = [make_plan(0, r, len(blocks), 2) for r in range(n_rounds + 1)]
    k = topk_per_chunk(topk)
    return [
        round_bytes(plans[r], plans[r + 1], 1, "copy", block_b, shared_b, precision, k, block_precision)[0]
        for r in range(n_rounds)
    ]


def rounds(path):
    with h5py.File(path, "r") as f:
        return {k: f["rounds"][k][...] for k in f["rounds"]}, dict(f.attrs)


def load(path):
    return torch.load(path.with_suffix(".ckpt.pt"), map_location="cpu", weights_only=True)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher,extra",
    [
        # stopped at round 3 of 6, a round the uninterrupted run does not synchronise fully
        (
            mpirun,
            ["--method", "ist", "--shared-precision", "int4", "--shared-topk", "0.05", "--block-precision", "int8"],
        ),
        (torchrun, ["--method", "local-sgd", "--shared-precision", "int8"]),
    ],
)
def test_resume_from_a_checkpoint_is_exact(tmp_path, launcher, extra):
    args = ["synthetic", "--epochs", "3", *TINY_RUN, "--checkpoint-every", "2", *extra]
    ref, cut = tmp_path / "ref.h5", tmp_path / "cut.h5"
    launcher(2, BIN / "hist-train", *args, "--out", ref, timeout=300)
    check_recorded(f"quantized-{extra[1]}-{launcher.__name__}", ref)
    stopped = launcher(2, BIN / "hist-train", *args, "--out", cut, "--stop-after-rounds", "3", check=False)
    # hist-train exits 3; torchrun reports any child's non-zero exit as its own 1
    assert stopped.returncode in (1, 3) and load(cut)["round"] == 3, stopped.stderr[-2000:]
    launcher(2, BIN / "hist-train", *args, "--out", cut, "--resume", timeout=300)
    a, b = load(ref), load(cut)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if not k.endswith("num_batches_tracked"))
    ra, rb = a["hist"]["method"]["residuals"], b["hist"]["method"]["residuals"]
    assert len(ra) == 2 and all(torch.equal(x[n][k], y[n][k]) for x, y in zip(ra, rb) for n in x for k in x[n])
    assert not torch.equal(ra[0][next(iter(ra[0]))]["residual"], ra[1][next(iter(ra[1]))]["residual"])  # per rank
    if "--block-precision" in extra:  # the blocks' reference, the same on every rank, resumed
        assert all(
            torch.equal(x, y)
            for xs, ys in zip(a["hist"]["method"]["block_base"], b["hist"]["method"]["block_base"])
            for x, y in zip(xs, ys)
        )
    (la, attrs), (lb, _) = rounds(ref), rounds(cut)
    if launcher is mpirun:  # what the run counted is what hist-bench counts for its settings
        traffic = json.loads(attrs["traffic"])  # and the timing file names each kind's precision
        assert traffic["shared"].startswith("int4 change and momentum, top-k 0.05") and traffic["blocks"].startswith(
            "int8"
        )
        assert np.array_equal(la["bytes_sent"].sum(axis=1)[[0, 2, 4]], counted_bytes(6, "int4", 0.05, "int8")[::2])
    assert np.array_equal(la["loss"], lb["loss"])
    same = [r for r in range(len(la["loss"])) if r != 2]  # round 3 of the cut run sent everything to everyone
    assert np.array_equal(la["bytes_sent"][same], lb["bytes_sent"][same])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--shared-topk", "1.5"], "--shared-topk 1.5 must be a fraction in [0, 1)"),
        (["--method", "dp", "--shared-precision", "int8"], "--method dp averages gradients every step"),
        (["--block-precision", "int8", "--aggregate", "average"], "--block-precision int8 delivers IST blocks"),
        (["--block-precision", "fp16", "--method", "local-sgd"], "it needs --method ist and --aggregate copy"),
        (["--shared-precision", "int2"], "'int2' is not one of 'fp32', 'fp16', 'int8', 'int4'"),
    ],
)
def test_a_bad_option_gets_one_line(tmp_path, args, needle):
    """In-process (the command object hist-train calls): an option check starts no ranks."""
    result = hist_train("synthetic", *TINY_RUN, "--out", tmp_path / "x.h5", *args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.exc_info
    assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if "rror" in line]) == 1
