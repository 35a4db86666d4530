"""The installed stack, for real: Horovod over Gloo and over MPI, process sets, and mpi4py beside it."""

from pathlib import Path

import pytest

from helpers import BIN, ROOT, horovodrun, mpirun, run

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


def _variant(tmp_path, **env):
    """What tools/bootstrap.sh would build here, without building anything."""
    return run(["bash", ROOT / "tools" / "bootstrap.sh", "--print-variant"], HIST_VENV=BIN.parent, **env).stdout.split()


def test_installer_builds_the_nccl_variant_only_where_cuda_is(tmp_path):
    # This machine's torch is the CPU wheel (torch.version.cuda is None): the CPU build.
    key, ops = _variant(tmp_path)
    assert key.endswith("-cpu") and ops == "gpu_operations="
    # A CUDA torch cannot be installed here: HIST_TORCH_CUDA stands in for torch.version.cuda
    # (a mock, said so in bootstrap.sh), with an nvcc on the PATH ...
    fake = tmp_path / "fake-cuda-bin"
    fake.mkdir()
    (fake / "nvcc").write_text("#!/bin/sh\necho nvcc\n")
    (fake / "nvcc").chmod(0o755)
    key, ops = _variant(tmp_path, HIST_TORCH_CUDA="12.4", PATH=f"{fake}:/usr/bin:/bin", CUDA_HOME=str(tmp_path))
    assert key.endswith("-cuda12.4-nccl") and ops == "gpu_operations=NCCL"
    # ... and without nvcc anywhere, Horovod cannot build its CUDA kernels: the CPU build again.
    key, _ = _variant(tmp_path, HIST_TORCH_CUDA="12.4", PATH="/usr/bin:/bin", CUDA_HOME=str(tmp_path))
    assert key.endswith("-cpu")
