"""The IST engine across real processes: Horovod process sets plus MPI block exchange."""

from pathlib import Path

import pytest

from helpers import BIN, horovodrun, mpirun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CHECK = Path(__file__).parent / "parallel" / "engine_check.py"


@pytest.mark.parametrize(
    "launcher,np_,subnets,aggregate,min_depth,precision,opt_state,outer",
    [
        ("horovodrun", 2, 2, "copy", 0, "fp32", "restart", "plain"),
        ("mpirun", 4, 4, "copy", 0, "fp32", "restart", "plain"),
        (
            "mpirun",
            4,
            2,
            "copy",
            0,
            "fp32",
            "restart",
            "plain",
        ),  # two ranks per subnetwork: gradients averaged on a process set
        ("horovodrun", 4, 2, "average", 0, "fp32", "restart", "plain"),
        (
            "mpirun",
            4,
            4,
            "average",
            2,
            "fp32",
            "restart",
            "plain",
        ),  # minimum depth: shared blocks averaged across holders
        ("mpirun", 4, 4, "copy", 2, "fp32", "restart", "plain"),
        ("horovodrun", 2, 2, "copy", 0, "fp16", "restart", "plain"),  # shared parameters averaged as fp16 changes
        ("mpirun", 4, 2, "copy", 0, "fp32", "average", "plain"),  # momentum travels with its block
        ("mpirun", 4, 4, "average", 2, "fp32", "average", "nesterov"),  # DiLoCo outer step among holders
        ("horovodrun", 2, 2, "copy", 0, "fp16", "average", "nesterov"),
    ],
)
def test_one_round_trains_the_planned_blocks_and_aggregates_exactly(
    launcher, np_, subnets, aggregate, min_depth, precision, opt_state, outer
):
    launch = horovodrun if launcher == "horovodrun" else mpirun
    proc = launch(np_, BIN / "python", CHECK, subnets, aggregate, min_depth, precision, opt_state, outer, timeout=300)
    assert proc.stdout.count("OK rank") == np_
