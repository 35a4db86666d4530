"""The IST engine across real processes: Horovod process sets plus MPI block exchange."""

from pathlib import Path

import pytest

from helpers import BIN, horovodrun, mpirun

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CHECK = Path(__file__).parent / "parallel" / "engine_check.py"


# One launch per (launcher, ranks, subnetworks) checks several configurations in turn (a launch
# of 2-4 ranks costs more here than a check). Each configuration:
# AGGREGATE,MIN_DEPTH,SHARED_PRECISION,OPTIMIZER_STATE,OUTER,STEP,OVERLAP (tests/parallel/engine_check.py).
@pytest.mark.parametrize(
    "launcher,np_,subnets,specs",
    [
        (
            "horovodrun",
            2,
            2,
            [
                "copy,0,fp32,restart,plain,fp32,overlap",
                "copy,0,fp16,restart,plain,fp32,overlap",  # shared parameters averaged as fp16 changes
                "copy,0,fp16,average,nesterov,fp32,overlap",
                # bf16 autocast with channels_last weights, transfers one after another
                "copy,0,fp16,average,plain,bf16-cl,sequential",
            ],
        ),
        (
            "mpirun",
            4,
            4,
            [
                "copy,0,fp32,restart,plain,fp32,overlap",
                "average,2,fp32,restart,plain,fp32,overlap",  # minimum depth: shared blocks averaged across holders
                "copy,2,fp32,restart,plain,fp32,overlap",
                "average,2,fp32,average,nesterov,fp32,overlap",  # DiLoCo outer step among holders
                "copy,2,fp32,restart,nesterov,fp32,sequential",
            ],
        ),
        (
            "mpirun",
            4,
            2,
            [
                "copy,0,fp32,restart,plain,fp32,overlap",  # two ranks per subnetwork: gradients averaged on a process set
                "copy,0,fp32,average,plain,fp32,overlap",  # momentum travels with its block
                # bf16 autocast with channels_last weights: Horovod gets contiguous copies, results land in place
                "average,0,fp32,average,plain,bf16-cl,overlap",
                # (once a launch of its own under horovodrun; horovodrun runs this very mpirun line,
                # and keeps its own launch above)
                "average,0,fp32,restart,plain,fp32,overlap",
            ],
        ),
    ],
)
def test_rounds_train_the_planned_blocks_and_aggregate_exactly(launcher, np_, subnets, specs):
    launch = horovodrun if launcher == "horovodrun" else mpirun
    proc = launch(np_, BIN / "python", CHECK, subnets, *specs, timeout=300)
    assert proc.stdout.count("OK rank") == np_ * len(specs), proc.stdout


OVERFLOW = Path(__file__).parent / "parallel" / "overflow_check.py"


@pytest.mark.parametrize("method,np_", [("ist", 4), ("dp", 2)])
def test_fp16_overflow_on_one_rank_is_skipped_by_every_rank_that_averages_with_it(method, np_):
    proc = mpirun(np_, BIN / "python", OVERFLOW, method, timeout=300)
    assert proc.stdout.count("OK rank") == np_
