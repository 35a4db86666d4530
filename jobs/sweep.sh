#!/usr/bin/env bash
# Submit the comparison: 1-, 2-, 4- and 8-GPU runs of ist, local-sgd and dp on one dataset,
# then a report job that runs once they have all ended (afterany) and writes the figures and
# table into the sweep's folder.
#
#   jobs/sweep.sh cifar10 [-- hist-train options]
#   GPUS="1 2 4" METHODS="ist dp" jobs/sweep.sh cifar100 -- --epochs 50
# Variables: GPUS ("1 2 4 8"), METHODS ("ist local-sgd dp"), SWEEP_DIR (runs/sweep-<dataset>-<time>),
# SBATCH_ARGS (extra sbatch options for every job, e.g. "--partition=big --time=12:00:00"),
# HIST_BACKEND (torch: every job under torch.distributed, srun --mpi=none; slurm/common.sh).
#   HIST_BACKEND=torch jobs/sweep.sh cifar10
# Run from the repository root. Prints the folder and the job ids.
set -euo pipefail
dataset=${1:?usage: jobs/sweep.sh DATASET [-- hist-train options]}
shift
[ "${1:-}" = "--" ] && shift
gpus=${GPUS:-1 2 4 8}
methods=${METHODS:-ist local-sgd dp}
dir=${SWEEP_DIR:-runs/sweep-$dataset-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$dir"
read -r -a extra <<< "${SBATCH_ARGS:-}"
ids=()
submit() {  # template, method, hist-train args...
  local template=$1 method=$2; shift 2
  local id
  id=$(DATASET=$dataset METHOD=$method HIST_OUT_DIR=$dir sbatch --parsable --export=ALL \
       --output="$dir/%x-%j.out" "${extra[@]}" "$template" "$@")
  id=${id%%;*}
  ids+=("$id")
  echo "submitted $id: $template METHOD=$method"
}
for n in $gpus; do
  if [ "$n" = 1 ]; then
    submit slurm/single_1gpu.sbatch ist "$@"
  else
    [ -f "slurm/ist_${n}gpu.sbatch" ] || { echo "no template slurm/ist_${n}gpu.sbatch" >&2; exit 2; }
    for m in $methods; do submit "slurm/ist_${n}gpu.sbatch" "$m" "$@"; done
  fi
done
deps=$(IFS=:; echo "${ids[*]}")
report=$(sbatch --parsable --export=ALL --dependency="afterany:$deps" --output="$dir/%x-%j.out" \
         "${extra[@]}" slurm/report.sbatch "$dir")
echo "submitted ${report%%;*}: report into $dir/report (after ${ids[*]})"
echo "$dir"
