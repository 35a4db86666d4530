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
    # ... without NCCL anywhere: no CPU-only Horovod on a CUDA machine (GPU tensors crash or hang
    # it at the first collective): one line and exit 1, unless HIST_HOROVOD_CPU=1 asks for it.
    no_nccl = fake_cuda_tree(tmp_path / "b", nccl=None)
    proc = _bootstrap("--print-variant", check=False, **no_nccl)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "[bootstrap] torch has CUDA 12.4 but NCCL was not found: pip install nvidia-nccl-cu12 or set "
        "HOROVOD_NCCL_HOME; a CPU-only Horovod crashes or hangs on GPU tensors: install them, or set "
        "HIST_HOROVOD_CPU=1 to build it for --device cpu"
    ]
    proc = _bootstrap("--print-variant", HIST_HOROVOD_CPU="1", **no_nccl)
    assert proc.stdout.split()[0].endswith("-cpu-open-mpi-4.1.4")
    assert "NCCL was not found: pip install nvidia-nccl-cu12 or set HOROVOD_NCCL_HOME" in proc.stdout
    # ... and without nvcc anywhere, Horovod cannot build its CUDA kernels: the same stop, or the CPU build.
    no_nvcc = {**fake_cuda_tree(tmp_path / "c"), "CUDA_HOME": str(tmp_path / "none")}
    proc = _bootstrap("--print-variant", check=False, **no_nvcc)
    assert proc.returncode == 1 and "torch has CUDA 12.4 but no nvcc is on PATH or in $CUDA_HOME/bin" in proc.stderr
    key, *_ = _variant(tmp_path, HIST_HOROVOD_CPU="1", **no_nvcc)
    assert key.endswith("-cpu-open-mpi-4.1.4")


def _bootstrap(*args, check=True, **env):
    return run(["bash", ROOT / "tools" / "bootstrap.sh", *args], check=check, HIST_VENV=BIN.parent, **env)


def test_gpu_operations_set_by_hand_need_nvcc_and_nccl_whatever_torch_has(tmp_path):
    # HOROVOD_GPU_OPERATIONS=NCCL by hand without nvcc or NCCL used to reach CMake as
    # HOROVOD_CUDA_HOME=. and HOROVOD_NCCL_INCLUDE=/include; now one line, and the opt-out does not apply.
    tree = fake_cuda_tree(tmp_path)
    for env, why in (
        ({**tree, "CUDA_HOME": str(tmp_path / "none")}, "HOROVOD_GPU_OPERATIONS=NCCL but no nvcc is on PATH"),
        ({**tree, "PYTHONPATH": ""}, "HOROVOD_GPU_OPERATIONS=NCCL but NCCL was not found"),
        ({**tree, "PYTHONPATH": "", "HIST_TORCH_CUDA": ""}, "HOROVOD_GPU_OPERATIONS=NCCL but NCCL was not found"),
    ):
        proc = _bootstrap("--print-variant", check=False, HOROVOD_GPU_OPERATIONS="NCCL", HIST_HOROVOD_CPU="1", **env)
        assert proc.returncode == 1 and proc.stderr.startswith(f"[bootstrap] {why}"), proc.stderr
    out = _bootstrap("--print-variant", HOROVOD_GPU_OPERATIONS="NCCL", **tree).stdout.split()
    assert out[1] == "gpu_operations=NCCL" and out[2] == f"nccl={tmp_path}/site/nvidia/nccl"


def test_the_installed_horovod_is_checked_against_a_cuda_torch():
    # The Horovod installed here is the CPU build: right for this CPU torch, wrong for a CUDA
    # one (HIST_TORCH_CUDA stands in for torch.version.cuda: no CUDA torch installs here).
    assert "fits this machine" in _bootstrap("--check").stderr
    proc = _bootstrap("--check", check=False, HIST_TORCH_CUDA="12.4")
    assert proc.returncode == 1 and proc.stderr.startswith(
        "[bootstrap] torch has CUDA 12.4 but the installed Horovod has no NCCL, so GPU tensors crash or hang it"
    )
    assert "fits this machine" in _bootstrap("--check", HIST_TORCH_CUDA="12.4", HIST_HOROVOD_CPU="1").stderr
