#!/usr/bin/env bash
# The effect of each accuracy option, one run each, on one machine: IST at 2 processes with one
# option changed from the preset, beside the one-process run and the baselines with the same
# treatment. Every run writes its timing file into one folder; the table (option, final
# accuracy, wall time, bytes per round) goes to options.md there. Finished runs are kept, so
# running it again continues an interrupted sweep.
#
#   jobs/options.sh DATA_DIR [FOLDER] [-- extra hist-train options]
#   e.g. jobs/options.sh ../shared/data/cifar10 runs/options -- --epochs 3
# Variables: PRESET (cpu), ONLY (space-separated names to run; default all).
set -euo pipefail
data=${1:?usage: jobs/options.sh DATA_DIR [FOLDER] [-- hist-train options]}
shift
folder=runs/options
if [ $# -gt 0 ] && [ "$1" != "--" ]; then folder=$1; shift; fi
[ "${1:-}" = "--" ] && shift
preset=${PRESET:-cpu}
bin=$(dirname "$(command -v hist-train)")
mkdir -p "$folder"
# name | processes | method | options. "reference" is the ResIST release's treatment (momentum
# restarted every round, no learning-rate scaling, no warm-up); the other rows start from
# hist's defaults (momentum averaged, lr x processes, half an epoch of warm-up) unless they
# say otherwise. The table lists each row's resolved settings, read from its timing file.
REF="--optimizer-state restart --lr-scaling none --warmup-epochs 0"
runs=(
  "single|1|ist|--warmup-epochs 0"
  "ist|2|ist|$REF"
  "ist momentum averaged|2|ist|--optimizer-state average --lr-scaling none --warmup-epochs 0"
  "ist lr x2 (linear), warm-up 0.5|2|ist|--optimizer-state restart --lr-scaling linear --warmup-epochs 0.5"
  "ist momentum averaged, lr x2|2|ist|--optimizer-state average --lr-scaling linear --warmup-epochs 0.5"
  "ist outer Nesterov 0.7/0.9|2|ist|$REF --outer-lr 0.7 --outer-momentum 0.9"
  "ist local SGD first 0.5 epoch|2|ist|$REF --warmup-local-sgd-epochs 0.5"
  "ist defaults, local iters 10|2|ist|--local-iters 10"
  "ist defaults, BN calibration 32 batches|2|ist|--bn-batches 32"
  "ist defaults, min depth 14|2|ist|--min-depth 14"
  "local-sgd|2|local-sgd|$REF"
  "local-sgd momentum averaged, lr x2|2|local-sgd|--optimizer-state average --lr-scaling linear --warmup-epochs 0.5"
  "dp|2|dp|--lr-scaling none --warmup-epochs 0"
  "dp lr x2 (linear), warm-up 0.5|2|dp|--lr-scaling linear --warmup-epochs 0.5"
)
for spec in "${runs[@]}"; do
  IFS='|' read -r name n method options <<< "$spec"
  file=$folder/$(echo "$name" | tr -c 'a-zA-Z0-9.\n' '-' | tr -s '-').h5
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $(basename "$file" .h5) "* ]]; then continue; fi
  if [ -f "$file" ] && "$bin/python" -c "import h5py,sys; sys.exit(h5py.File(sys.argv[1],'r').attrs.get('status')!='completed')" "$file" 2>/dev/null; then
    echo "kept: $name"; continue
  fi
  read -r -a opts <<< "$options"
  cmd=("$bin/hist-train" cifar10 --data-dir "$data" --preset "$preset" --method "$method" "${opts[@]}" "$@" --out "$file")
  [ "$n" -gt 1 ] && cmd=("$bin/horovodrun" -np "$n" -H "localhost:$n" "${cmd[@]}")
  echo "run: $name: ${cmd[*]}"
  start=$(date +%s)
  "${cmd[@]}" > "${file%.h5}.log" 2>&1 || { echo "failed: $name (see ${file%.h5}.log)"; exit 1; }
  "$bin/python" - "$file" "$name" <<'PY'
import h5py, sys
with h5py.File(sys.argv[1], "a") as f:
    f.attrs["option_name"] = sys.argv[2]
PY
  echo "done: $name in $(( $(date +%s) - start )) s"
done
"$bin/python" - "$folder" <<'PY'
import sys
from pathlib import Path
from hist.analysis.report import load_runs
KEYS = [("optimizer_state", "momentum"), ("lr_scaling", "lr scaling"), ("warmup_epochs", "warm-up epochs"),
        ("outer_lr", "outer lr"), ("outer_momentum", "outer momentum"),
        ("warmup_local_sgd_epochs", "local-SGD epochs first"), ("local_iters", "local iters"),
        ("bn_batches", "BN batches"), ("min_depth", "min depth")]
runs = load_runs([Path(sys.argv[1])])
name = lambda run: str(run.attrs.get("option_name", run.path.stem))
ref = next((r.config for r in runs if name(r) == "ist"), {})
rows = []
for run in runs:
    e, r, c = run.evals, run.rounds, run.config
    if run.attrs.get("status") != "completed" or not len(e["test_accuracy"]):
        continue  # running or interrupted: not a result yet
    diff = ", ".join(f"{label} {c.get(k)}" for k, label in KEYS if c.get(k) != ref.get(k)) or "-"
    rows.append((name(run), run.attrs["method"], int(run.attrs["world_size"]), diff, float(e["test_accuracy"][-1]),
                 float(r["wall_s"][-1]), float(r["bytes_sent"].sum(axis=1).mean()) / 1e6, float(r["epoch"][-1])))
rows.sort(key=lambda x: (x[0] != "single", x[0] != "ist", x[1], x[0]))
single = next((x[4] for x in rows if x[0] == "single"), None)
lines = ["| run | method, processes | settings that differ from the reference `ist` row | test accuracy | vs single | wall | MB/round | epochs |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for n, method, world, diff, acc, wall, mb, ep in rows:
    vs = f"{acc - single:+.2f}" if single is not None else "-"
    lines.append(f"| {n} | {method}, {world} | {diff} | {acc:.2f}% | {vs} | {wall:.0f} s | {mb:.2f} | {ep:.2f} |")
text = "\n".join(lines)
(Path(sys.argv[1]) / "options.md").write_text(text + "\n")
print(text)
PY
