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


def fake_cuda_tree(tmp_path, nccl="pip"):
    """A toolchain that cannot be installed here (a mock, said so): an nvcc that prints its
    release, under CUDA_HOME only, and NCCL where pip's nvidia-nccl-cu12 puts it."""
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    (cuda / "bin" / "nvcc").chmod(0o755)
    site = tmp_path / "site"
    if nccl == "pip":  # nvidia/nccl is a namespace package: lib/libnccl.so.2 and include/nccl.h, no __init__
        home = site / "nvidia" / "nccl"
        (home / "lib").mkdir(parents=True)
        (home / "include").mkdir()
        (home / "lib" / "libnccl.so.2").write_bytes(b"")
        (home / "include" / "nccl.h").write_text("")
    return dict(HIST_TORCH_CUDA="12.4", PATH="/usr/bin:/bin", CUDA_HOME=str(cuda), PYTHONPATH=str(site))


def test_installer_builds_the_nccl_variant_only_where_cuda_nvcc_and_nccl_are(tmp_path):
    # This machine's torch is the CPU wheel (torch.version.cuda is None): the CPU build, keyed by its MPI.
    key, ops, *_ = _variant(tmp_path)
    assert key.endswith("-cpu-open-mpi-4.1.4") and ops == "gpu_operations="
    # torch with CUDA (HIST_TORCH_CUDA stands in for torch.version.cuda), nvcc in $CUDA_HOME only,
    # NCCL from pip: NCCL, and the key names nvcc's release and the MPI.
    out = _variant(tmp_path, **fake_cuda_tree(tmp_path))
    assert out[0].endswith("-cuda12.4-nvcc12.4-nccl-open-mpi-4.1.4") and out[1] == "gpu_operations=NCCL"
    assert out[2] == f"nccl={tmp_path}/site/nvidia/nccl" and out[3] == f"nvcc={tmp_path}/cuda/bin/nvcc"
    # ... without NCCL anywhere: the CPU build, and the one line that says why.
    proc = run(
        ["bash", ROOT / "tools" / "bootstrap.sh", "--print-variant"],
        HIST_VENV=BIN.parent,
        **fake_cuda_tree(tmp_path / "b", nccl=None),
    )
    assert proc.stdout.split()[0].endswith("-cpu-open-mpi-4.1.4")
    assert "NCCL was not found: pip install nvidia-nccl-cu12 or set HOROVOD_NCCL_HOME" in proc.stdout
    # ... and without nvcc anywhere, Horovod cannot build its CUDA kernels: the CPU build again.
    env = {**fake_cuda_tree(tmp_path / "c"), "CUDA_HOME": str(tmp_path / "none")}
    key, *_ = _variant(tmp_path, **env)
    assert key.endswith("-cpu-open-mpi-4.1.4")
