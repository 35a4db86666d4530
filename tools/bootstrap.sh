#!/usr/bin/env bash
# Installs everything hist needs, each piece only once, so that `make demo` and
# `make test` work on a fresh Debian 12 machine and start in seconds afterwards.
#   system (apt, root): Open MPI, HDF5 tools, Slurm + munge (for the Slurm tests)
#   $HIST_VENV (default .venv): torch, mpi4py, numpy, h5py, click, matplotlib, tensorboard, horovod, hist
#   $HIST_CACHE (default ~/.cache/hist): the Horovod wheel, built once per
#     (Horovod, torch, Python, build variant) because its build takes ~9 minutes on 2 cores.
#     The variant is `cpu-<mpi>` (MPI and Gloo), or `cuda<v>-nvcc<v>-nccl-<mpi>` where CUDA is
#     present (torch built with CUDA, nvcc on PATH or in $CUDA_HOME, NCCL found: pip's
#     nvidia-nccl-cu*, $HOROVOD_NCCL_HOME, the CUDA tree or /usr): then Horovod is built with
#     HOROVOD_GPU_OPERATIONS=NCCL, pointed at that NCCL and nvcc, so GPU tensors are reduced by
#     NCCL on the device. HOROVOD_GPU_OPERATIONS set by you wins, and needs nvcc (and NCCL for NCCL).
#     Where torch has CUDA but nvcc or NCCL is missing, it stops with one line rather than build a
#     CPU-only Horovod (GPU tensors crash or hang it); HIST_HOROVOD_CPU=1 asks for that CPU build.
# On a cluster, inside an activated conda env or module environment:
#   tools/bootstrap.sh --horovod-only   builds/installs Horovod (and hist) into that Python only.
#   tools/bootstrap.sh --print-variant  prints the wheel key this machine would build, and stops.
#   tools/bootstrap.sh --check          checks the installed Horovod fits this machine, and stops.
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

# The Horovod build this machine needs: NCCL for GPU tensors where torch has CUDA, nvcc exists
# and NCCL itself is found. (HIST_TORCH_CUDA stands in for torch.version.cuda; the tests use it,
# and a fake toolchain tree, on this CPU-only machine.)
torch_cuda() { echo "${HIST_TORCH_CUDA-$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)}"; }
# nvcc on PATH, else under $CUDA_HOME (Horovod itself only looks at HOROVOD_CUDA_HOME and PATH).
find_nvcc() {
  if command -v nvcc >/dev/null; then command -v nvcc
  elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  fi
}
nvcc_version() { "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n1; }
# NCCL's home (lib/ and include/): HOROVOD_NCCL_HOME, pip's nvidia-nccl-cu* (all pip torch has),
# then the CUDA tree and the system's library folders.
find_nccl() {
  if [ -n "${HOROVOD_NCCL_HOME:-}" ]; then echo "$HOROVOD_NCCL_HOME"; return; fi
  local d
  d=$("$venv/bin/python" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null || true)
  for home in "$d" "${CUDA_HOME:-/usr/local/cuda}" /usr; do
    [ -n "$home" ] || continue
    for lib in lib lib64 lib/x86_64-linux-gnu; do
      if ls "$home/$lib"/libnccl.so* >/dev/null 2>&1 && [ -f "$home/include/nccl.h" ]; then echo "$home"; return; fi
    done
  done
}
# The MPI Horovod is built against, as a key part: "open-mpi-4.1.4".
mpi_id() {
  local v
  v=$(mpirun --version 2>/dev/null | head -n1 || true)
  v=$(echo "${v,,}" | sed -E 's/^mpirun *//; s/[^a-z0-9.]+/-/g; s/^-+|-+$//g')
  echo "${v:-nompi}"
}
gpu_operations() {
  if [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then echo "$HOROVOD_GPU_OPERATIONS"; return; fi
  if [ -n "$(torch_cuda)" ] && [ -n "$(find_nvcc)" ] && [ -n "$(find_nccl)" ]; then echo NCCL; fi
}
# Why the GPU build this machine needs cannot be made, if it cannot: one line for the user.
# GPU operations set by hand need nvcc (and NCCL for NCCL) whatever torch has.
why_not_nccl() {
  local cuda ops=${HOROVOD_GPU_OPERATIONS:-} asked
  cuda=$(torch_cuda)
  asked=${ops:+HOROVOD_GPU_OPERATIONS=$ops}
  [ -n "$cuda$ops" ] || return 0
  [ -n "$(find_nvcc)" ] || { echo "${asked:-torch has CUDA $cuda} but no nvcc is on PATH or in \$CUDA_HOME/bin"; return 0; }
  [ "${ops:-NCCL}" != NCCL ] || [ -n "$(find_nccl)" ] || \
    echo "${asked:-torch has CUDA $cuda} but NCCL was not found: pip install nvidia-nccl-cu${cuda%%.*} or set HOROVOD_NCCL_HOME"
  return 0
}
# Stops (one line, exit 1) where the GPU build cannot be made: a CPU-only Horovod maps CUDA
# tensors to its CPU path, whose callbacks throw outside its error handling, so the first
# collective crashes or hangs. HIST_HOROVOD_CPU=1 asks for the CPU build on purpose.
require_gpu_build() {
  local why
  why=$(why_not_nccl)
  [ -n "$why" ] || return 0
  [ -n "${HOROVOD_GPU_OPERATIONS:-}" ] && { say "$why"; exit 1; }
  [ "${HIST_HOROVOD_CPU:-}" = 1 ] && return 0
  say "$why; a CPU-only Horovod crashes or hangs on GPU tensors: install them, or set HIST_HOROVOD_CPU=1 to build it for --device cpu"
  exit 1
}
# The installed Horovod against this machine: PyTorch always; NCCL where it was asked for, or
# where torch has CUDA (unless HIST_HOROVOD_CPU=1).
check_installed() {
  local nccl cuda
  # horovod.torch imports only where Horovod was built with PyTorch; nccl_built() is 0 without
  # NCCL. (What `horovodrun --check-build` lists, in 2 s instead of its 10.)
  nccl=$("$venv/bin/python" -c 'import horovod.torch as hvd; print(1 if hvd.nccl_built() else 0)' 2>/dev/null) ||
    { say "horovod lacks PyTorch support"; exit 1; }
  cuda=$(torch_cuda)
  if [ "$(gpu_operations)" = NCCL ] || { [ -n "$cuda" ] && [ -z "${HOROVOD_GPU_OPERATIONS:-}" ] && [ "${HIST_HOROVOD_CPU:-}" != 1 ]; }; then
    [ "$nccl" = 1 ] || {
      say "${cuda:+torch has CUDA $cuda but }the installed Horovod has no NCCL, so GPU tensors crash or hang it: pip uninstall horovod, then run this again where nvcc and NCCL are found, or set HIST_HOROVOD_CPU=1 to keep it for --device cpu"
      exit 1; }
  fi
}
wheel_variant() {
  local ops nvcc
  ops=$(gpu_operations)
  if [ -z "$ops" ]; then echo "cpu-$(mpi_id)"; return; fi
  nvcc=$(find_nvcc)
  echo "cuda$(torch_cuda)-nvcc$(nvcc_version "$nvcc")-${ops,,}-$(mpi_id)"
}
wheel_key() {
  local pyver
  pyver=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  echo "horovod-$horovod_version-torch-$torch_version-$pyver-$(wheel_variant)"
}
if [ "${1:-}" = "--print-variant" ]; then
  require_gpu_build
  echo "$(wheel_key) gpu_operations=$(gpu_operations) nccl=$(find_nccl) nvcc=$(find_nvcc)"
  why=$(why_not_nccl); [ -z "$why" ] || echo "cpu build (HIST_HOROVOD_CPU=1) because: $why"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  check_installed
  say "the installed Horovod fits this machine: $venv"
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
  "$venv/bin/pip" install -q "torch==$torch_version" numpy h5py click matplotlib scipy pytest pytest-xdist ruff \
    cloudpickle psutil pyyaml packaging cffi tensorboard
  # mpi4py compiled against the system Open MPI (the one Horovod and mpirun use).
  "$venv/bin/python" -c "import mpi4py" 2>/dev/null || \
    MPICC=mpicc "$venv/bin/pip" install -q --no-binary mpi4py mpi4py
}

horovod_wheel() {
  local key dir src ops legacy
  key=$(wheel_key)
  ops=$(gpu_operations)
  dir="$cache/wheels/$key"
  # CPU wheels cached before the key named the MPI (".../-cpu") or the variant were built
  # against this machine's system MPI: adopt them.
  if [ "$key" != "${key%-cpu-*}" ] && [ ! -d "$dir" ]; then
    for legacy in "$cache/wheels/${key%-cpu-*}-cpu" "$cache/wheels/${key%-cpu-*}"; do
      if [ -d "$legacy" ]; then mv "$legacy" "$dir"; break; fi
    done
  fi
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
    local why nccl nvcc lib nccl_lib="" gpu_env=()
    why=$(why_not_nccl); [ -z "$why" ] || say "building without NCCL (HIST_HOROVOD_CPU=1): $why"
    if [ "$ops" = NCCL ]; then  # require_gpu_build found both
      nccl=$(find_nccl) nvcc=$(find_nvcc)
      for lib in lib lib64 lib/x86_64-linux-gnu; do
        if ls "$nccl/$lib"/libnccl.so* >/dev/null 2>&1; then nccl_lib=$nccl/$lib; break; fi
      done
      [ -n "$nccl_lib" ] || { say "no libnccl.so* under $nccl/lib, lib64 or lib/x86_64-linux-gnu: set HOROVOD_NCCL_HOME to NCCL's home"; exit 1; }
      # Horovod's FindNCCL misses pip's libnccl.so.2 and nvcc outside PATH: name both.
      gpu_env=(HOROVOD_NCCL_HOME="$nccl" HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$nccl_lib"
               HOROVOD_CUDA_HOME="$(dirname "$(dirname "$nvcc")")")
      # pip ships only libnccl.so.2: the linker looks for libnccl.so.
      [ -e "$nccl_lib/libnccl.so" ] || ln -sf libnccl.so.2 "$nccl_lib/libnccl.so" 2>/dev/null || true
    fi
    env ${ops:+HOROVOD_GPU_OPERATIONS=$ops} "${gpu_env[@]}" \
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
if ! "$venv/bin/python" -c "import horovod.torch" 2>/dev/null; then
  require_gpu_build  # before the build, at the top level: an exit inside $(...) would not end the script
  wheel=$(horovod_wheel)
  "$venv/bin/pip" install -q --no-deps "$wheel"
fi
"$venv/bin/pip" install -q --no-deps -e "$root"
check_installed
if [ "$horovod_only" = 0 ]; then rm -f "$venv"/.hist-bootstrap-*; touch "$stamp"; fi
say "ready: $venv"
