"""The installed stack, for real: Horovod over Gloo and over MPI, process sets, and mpi4py beside it."""

from pathlib import Path

import pytest

from helpers import BIN, horovodrun, mpirun, run

pytestmark = [pytest.mark.multiprocess]

HERE = Path(__file__).parent


def test_horovod_build_has_pytorch_mpi_and_gloo():
    out = run([BIN / "horovodrun", "--check-build"]).stdout
    for line in ("[X] PyTorch", "[X] MPI", "[X] Gloo"):
        assert line in out, out


def test_horovod_collectives_over_gloo():
    proc = horovodrun(2, "--gloo", BIN / "python", HERE / "parallel" / "stack_check.py", "gloo", timeout=180)
    assert proc.stdout.count("OK gloo") == 2


def test_horovod_and_mpi4py_over_mpirun():
    proc = mpirun(2, BIN / "python", HERE / "parallel" / "stack_check.py", "mpi", timeout=180)
    assert proc.stdout.count("OK mpi") == 2
