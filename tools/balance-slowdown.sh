#!/bin/bash
# Issue 22's measurement: --balance none against speed with one rank of two made about 2x slower
# by a real CPU-bound neighbour (not a sleep). Each rank is pinned to its own core (rank r -> core r);
# in the "slow" runs a busy loop shares rank 1's core. IST S=2, --data-split full, 3 epochs of
# preset cpu on the full CIFAR-10. Needs a 2-core machine to itself; about 25 minutes.
#   tools/balance-slowdown.sh DATA_DIR OUT_DIR        (then: tools/balance-slowdown.sh --summary OUT_DIR)
set -euo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
summary() {
  python - "$1" <<'PY'
import sys
from pathlib import Path
import numpy as np
from hist.io.timings import read_checked
print("| run | rounds | round time, mean (s) | second half (s) | wall per epoch (s) | test accuracy | blocks at the end |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for path in sorted(Path(sys.argv[1]).glob("*.h5")):
    run = read_checked(path)
    r = run.rounds
    busy = (r["data_s"] + r["compute_s"] + r["sync_s"]).max(axis=1)  # the round's time, as its slowest rank saw it
    half = busy[len(busy) // 2 :]
    epochs = float(r["epoch"][-1])
    acc = run.evals["test_accuracy"][-1] if len(run.evals["test_accuracy"]) else float("nan")
    blocks = "/".join(str(b) for b in r["blocks"][-1]) if "blocks" in r else "-"
    print(f"| {path.stem} | {len(busy)} | {busy.mean():.2f} | {half.mean():.2f} | "
          f"{float(run.attrs.get('total_wall_s', r['wall_s'][-1])) / epochs:.1f} | {acc:.2f}% | {blocks} |")
PY
}
if [ "${1:-}" = --summary ]; then summary "$2"; exit; fi
DATA=${1:?usage: tools/balance-slowdown.sh DATA_DIR OUT_DIR}; OUT=${2:?usage: tools/balance-slowdown.sh DATA_DIR OUT_DIR}
mkdir -p "$OUT"
PIN=$(mktemp); trap 'rm -f $PIN' EXIT
printf '#!/bin/bash\nexec taskset -c "${OMPI_COMM_WORLD_RANK:-0}" "$@"\n' > "$PIN"; chmod +x "$PIN"
for run in ${RUNS:-slow-none slow-speed even-none even-speed}; do
  kind=${run%-*}; balance=${run#*-}
  hog=
  if [ "$kind" = slow ]; then taskset -c 1 sh -c 'while :; do :; done' & hog=$!; fi
  echo "$(date -u +%T) $run"
  horovodrun -np 2 "$PIN" hist-train cifar10 --preset cpu --method ist --data-split full --epochs 3 \
    --balance "$balance" --data-dir "$DATA" --out "$OUT/$run.h5" > "$OUT/$run.log" 2>&1 || echo "$run failed: $OUT/$run.log"
  if [ -n "$hog" ]; then kill "$hog"; fi
done
summary "$OUT"
