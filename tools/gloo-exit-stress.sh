#!/bin/bash
# How often a torchrun rank aborts at exit after a run that succeeded ("terminate called without
# an active exception"; see TorchSynchroniser._tear_down): tests/parallel/quantized_check.py at 2
# ranks, N times, with a busy loop on another core to widen the race. Prints one line per abort
# and a count. Usage: tools/gloo-exit-stress.sh [N=40]   (about 12 s a run here)
set -u
n=${1:-40}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${HIST_BIN:-$root/.venv/bin}
aborted=0
(while :; do :; done) &
busy=$!
trap 'kill $busy' EXIT
for i in $(seq "$n"); do
  out=$(cd "$root" && PYTHONPATH=$root OMP_NUM_THREADS=1 "$bin/torchrun" --standalone --nproc-per-node 2 --no-python \
    "$bin/python" tests/parallel/quantized_check.py torch ist,int4,0,int8 local-sgd,fp32,0.02,fp32 2>&1)
  rc=$?
  if [ $rc -ne 0 ] || grep -q "terminate called" <<<"$out"; then
    aborted=$((aborted + 1))
    echo "run $i: exit $rc$(grep -m1 -o 'terminate called.*' <<<"$out" | sed 's/^/, /')"
  fi
done
echo "$aborted of $n runs aborted ($(git -C "$root" rev-parse --short HEAD))"
