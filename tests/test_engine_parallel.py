"""The IST engine across real processes: Horovod process sets plus MPI block exchange."""

from pathlib import Path

import pytest

from helpers import BIN, horovodrun, mpirun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CHECK = Path(__file__).parent / "parallel" / "engine_check.py"


@pytest.mark.parametrize(
    "launcher,np_,subnets,aggregate,min_depth,precision,opt_state,outer,step,overlap",
    [
        ("horovodrun", 2, 2, "copy", 0, "fp32", "restart", "plain", "fp32", "overlap"),
        ("mpirun", 4, 4, "copy", 0, "fp32", "restart", "plain", "fp32", "overlap"),
        (
            "mpirun",
            4,
            2,
            "copy",
            0,
            "fp32",
            "restart",
            "plain",
            "fp32",
            "overlap",
        ),  # two ranks per subnetwork: gradients averaged on a process set
        ("horovodrun", 4, 2, "average", 0, "fp32", "restart", "plain", "fp32", "overlap"),
        (
            "mpirun",
            4,
            4,
            "average",
            2,
            "fp32",
            "restart",
            "plain",
            "fp32",
            "overlap",
        ),  # minimum depth: shared blocks averaged across holders
        ("mpirun", 4, 4, "copy", 2, "fp32", "restart", "plain", "fp32", "overlap"),
        (
            "horovodrun",
            2,
            2,
            "copy",
            0,
            "fp16",
            "restart",
            "plain",
            "fp32",
            "overlap",
        ),  # shared parameters averaged as fp16 changes
        ("mpirun", 4, 2, "copy", 0, "fp32", "average", "plain", "fp32", "overlap"),  # momentum travels with its block
        (
            "mpirun",
            4,
            4,
            "average",
            2,
            "fp32",
            "average",
            "nesterov",
            "fp32",
            "overlap",
        ),  # DiLoCo outer step among holders
        ("horovodrun", 2, 2, "copy", 0, "fp16", "average", "nesterov", "fp32", "overlap"),
        # bf16 autocast with channels_last weights: Horovod gets contiguous copies, results land in place
        ("mpirun", 4, 2, "average", 0, "fp32", "average", "plain", "bf16-cl", "overlap"),
        ("horovodrun", 2, 2, "copy", 0, "fp16", "average", "plain", "bf16-cl", "sequential"),
        ("mpirun", 4, 4, "copy", 2, "fp32", "restart", "nesterov", "fp32", "sequential"),
    ],
)
def test_one_round_trains_the_planned_blocks_and_aggregates_exactly(
    launcher, np_, subnets, aggregate, min_depth, precision, opt_state, outer, step, overlap
):
    launch = horovodrun if launcher == "horovodrun" else mpirun
    args = (subnets, aggregate, min_depth, precision, opt_state, outer, step, overlap)
    proc = launch(np_, BIN / "python", CHECK, *args, timeout=300)
    assert proc.stdout.count("OK rank") == np_


OVERFLOW = Path(__file__).parent / "parallel" / "overflow_check.py"


@pytest.mark.parametrize("method,np_", [("ist", 4), ("dp", 2)])
def test_fp16_overflow_on_one_rank_is_skipped_by_every_rank_that_averages_with_it(method, np_):
    proc = mpirun(np_, BIN / "python", OVERFLOW, method, timeout=300)
    assert proc.stdout.count("OK rank") == np_
