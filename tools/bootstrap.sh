#!/usr/bin/env bash
# Installs everything hist needs, each piece only once, so that `make demo` and
# `make test` work on a fresh Debian 12 machine and start in seconds afterwards.
#   system (apt, root): Open MPI, HDF5 tools, Slurm + munge (for the Slurm tests)
#   $HIST_VENV (default .venv): torch, mpi4py, numpy, h5py, click, matplotlib, horovod, hist
#   $HIST_CACHE (default ~/.cache/hist): the Horovod wheel, built once per
#     (Horovod, torch, Python, build variant) because its build takes ~9 minutes on 2 cores.
#     The variant is `cpu` (MPI and Gloo), or `cuda<version>-nccl` where CUDA is present (torch
#     built with CUDA and nvcc found): then Horovod is built with HOROVOD_GPU_OPERATIONS=NCCL so
#     GPU tensors are reduced by NCCL on the device. HOROVOD_GPU_OPERATIONS set by you wins.
# On a cluster, inside an activated conda env or module environment:
#   tools/bootstrap.sh --horovod-only   builds/installs Horovod (and hist) into that Python only.
#   tools/bootstrap.sh --print-variant  prints the wheel key this machine would build, and stops.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${HIST_VENV:-$root/.venv}
python=${PYTHON:-python3}
horovod_version=0.28.1
torch_version=${HIST_TORCH_VERSION:-2.13.0}
cache=${HIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hist}
apt_packages="openmpi-bin libopenmpi-dev hdf5-tools slurmctld slurmd slurm-client munge"
say() { printf '[bootstrap] %s\n' "$*" >&2; }
horovod_only=0
if [ "${1:-}" = "--horovod-only" ]; then
  horovod_only=1
  venv=$(dirname "$(dirname "$(command -v python)")")
  torch_version=$(python -c 'import torch; print(torch.__version__.split("+")[0])')
fi

# The Horovod build this machine needs: NCCL for GPU tensors where torch has CUDA and nvcc exists.
# (HIST_TORCH_CUDA stands in for torch.version.cuda; the tests use it on this CPU-only machine.)
gpu_operations() {
  if [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then echo "$HOROVOD_GPU_OPERATIONS"; return; fi
  local cuda=${HIST_TORCH_CUDA-$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)}
  if [ -n "$cuda" ] && { command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
    echo NCCL
  fi
}
wheel_variant() {
  local ops cuda
  ops=$(gpu_operations)
  if [ -z "$ops" ]; then echo cpu; return; fi
  cuda=${HIST_TORCH_CUDA-$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)}
  echo "cuda${cuda}-${ops,,}"
}
wheel_key() {
  local pyver
  pyver=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  echo "horovod-$horovod_version-torch-$torch_version-$pyver-$(wheel_variant)"
}
if [ "${1:-}" = "--print-variant" ]; then
  echo "$(wheel_key) gpu_operations=$(gpu_operations)"
  exit 0
fi

# The stamp records what was installed; a change to setup.py or this script redoes the venv steps.
fingerprint=$(cat "$root/setup.py" "$0" | sha256sum | cut -c1-16)
stamp=$venv/.hist-bootstrap-$fingerprint
if [ "$horovod_only" = 0 ] && [ -f "$stamp" ]; then exit 0; fi

install_system_packages() {
  local missing=""
  for p in $apt_packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    say "missing system packages:$missing; run as root or: sudo apt-get install$missing"
    exit 1
  fi
  say "apt-get install$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d stops the Debian packages from starting their daemons; the Slurm tests start their own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

create_venv() {
  [ -x "$venv/bin/python" ] || { say "creating $venv"; "$python" -m venv "$venv"; }
  "$venv/bin/pip" install -q --upgrade pip wheel setuptools
  # torch pinned: here it resolves to the local CPU wheel; an unpinned torch pulls CUDA builds.
  "$venv/bin/pip" install -q "torch==$torch_version" numpy h5py click matplotlib scipy pytest ruff \
    cloudpickle psutil pyyaml packaging cffi
  # mpi4py compiled against the system Open MPI (the one Horovod and mpirun use).
  "$venv/bin/python" -c "import mpi4py" 2>/dev/null || \
    MPICC=mpicc "$venv/bin/pip" install -q --no-binary mpi4py mpi4py
}

horovod_wheel() {
  local key dir src ops legacy
  key=$(wheel_key)
  ops=$(gpu_operations)
  dir="$cache/wheels/$key"
  # Wheels cached before the key named its variant were CPU builds: adopt them.
  legacy="$cache/wheels/${key%-cpu}"
  if [ "$key" != "${key%-cpu}" ] && [ -d "$legacy" ] && [ ! -d "$dir" ]; then mv "$legacy" "$dir"; fi
  if ! ls "$dir"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $horovod_version for torch $torch_version, variant $(wheel_variant) (about 9 minutes on 2 cores, once)"
    src=$(mktemp -d)
    "$venv/bin/pip" download -q --no-deps --no-binary :all: "horovod==$horovod_version" -d "$src"
    tar -xzf "$src"/horovod-*.tar.gz -C "$src"
    # Horovod 0.28.1 asks for C++14; PyTorch >= 2.1 headers need C++17, and Gloo must match,
    # so the whole build is raised to 17 (top-level and torch CMakeLists both set it).
    sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/g; s/-std=c++14/-std=c++17/g' \
      "$src/horovod-$horovod_version/CMakeLists.txt" "$src/horovod-$horovod_version/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod-$horovod_version/CMakeLists.txt" || {
      say "could not raise the C++ standard in Horovod's CMakeLists.txt"; exit 1; }
    mkdir -p "$dir.tmp"
    env ${ops:+HOROVOD_GPU_OPERATIONS=$ops} \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    MAKEFLAGS="-j$(nproc)" \
      "$venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$dir.tmp" "$src/horovod-$horovod_version"
    rm -rf "$dir"; mv "$dir.tmp" "$dir"; rm -rf "$src"
  fi
  ls "$dir"/horovod-*.whl | head -n1
}

if [ "$horovod_only" = 0 ]; then
  install_system_packages
  create_venv
fi
"$venv/bin/python" -c "import horovod.torch" 2>/dev/null || \
  "$venv/bin/pip" install -q --no-deps "$(horovod_wheel)"
"$venv/bin/pip" install -q --no-deps -e "$root"
"$venv/bin/horovodrun" --check-build | grep -q '\[X\] PyTorch' || { say "horovod lacks PyTorch support"; exit 1; }
if [ "$(gpu_operations)" = NCCL ]; then
  "$venv/bin/horovodrun" --check-build | grep -q '\[X\] NCCL' || {
    say "CUDA is here but the installed Horovod has no NCCL: pip uninstall horovod, then run this again"; exit 1; }
fi
if [ "$horovod_only" = 0 ]; then rm -f "$venv"/.hist-bootstrap-*; touch "$stamp"; fi
say "ready: $venv"
