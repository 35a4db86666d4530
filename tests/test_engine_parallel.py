"""The IST engine across real processes: Horovod process sets plus MPI block exchange."""
from pathlib import Path

import pytest

from conftest import BIN, horovodrun, mpirun

CHECK = Path(__file__).parent / "parallel" / "engine_check.py"


@pytest.mark.parametrize("launcher,np_,subnets,aggregate,min_depth,precision", [
    ("horovodrun", 2, 2, "copy", 0, "fp32"),
    ("mpirun", 4, 4, "copy", 0, "fp32"),
    ("mpirun", 4, 2, "copy", 0, "fp32"),        # two ranks per subnetwork: gradients averaged on a process set
    ("horovodrun", 4, 2, "average", 0, "fp32"),
    ("mpirun", 4, 4, "average", 2, "fp32"),     # minimum depth: shared blocks averaged across holders
    ("mpirun", 4, 4, "copy", 2, "fp32"),
    ("horovodrun", 2, 2, "copy", 0, "fp16"),  # shared parameters averaged as fp16 changes
])
def test_one_round_trains_the_planned_blocks_and_aggregates_exactly(launcher, np_, subnets, aggregate, min_depth, precision):
    launch = horovodrun if launcher == "horovodrun" else mpirun
    proc = launch(np_, BIN / "python", CHECK, subnets, aggregate, min_depth, precision, timeout=300)
    assert proc.stdout.count("OK rank") == np_
