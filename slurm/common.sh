# Sourced by the slurm/*.sbatch templates: builds and runs the one command of a job.
#
# Launch: `srun --mpi=pmix hist-train ...`, one task per GPU. srun places the tasks on every
# node of the allocation (1 x N or 2 x 4 alike), wires MPI through PMIx with no hostfile, and
# `#SBATCH --signal=USR2@S` reaches every task, which is what hist-train's checkpoint-on-signal
# needs. (srun --mpi=pmi2 fails with Debian's Open MPI; pmix works.)
# The warning signal is USR2 (NCCL installs its own SIGUSR1 handler); HIST_STOP_SIGNAL names
# another, given to sbatch as well: HIST_STOP_SIGNAL=USR1 sbatch --signal=USR1@300 ...
#
# Variables: DATASET (cifar10), METHOD (ist | local-sgd | dp), HIST_DATA (data folder),
# HIST_OUT_DIR (runs), HIST_STOP_SIGNAL (USR2), HIST_DRY_RUN=1 prints the command instead of running it.
# Arguments after the template name go to hist-train: sbatch slurm/ist_2gpu.sbatch --epochs 2

hist_slurm_run() {
  local dataset=${DATASET:-cifar10} method=${METHOD:-ist} out_dir=${HIST_OUT_DIR:-runs}
  local ntasks=${SLURM_NTASKS:?run this inside a Slurm allocation (sbatch)}
  local job=${SLURM_JOB_ID:?no SLURM_JOB_ID}
  export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
  local tag=$method
  [ "$ntasks" = 1 ] && tag=single
  # The job id names the file, so a requeued job (same id) continues the same file.
  local out="$out_dir/${tag}-${dataset}-np${ntasks}-${job}.h5"
  local cmd=(srun --mpi=pmix --kill-on-bad-exit=1 hist-train "$dataset" --method "$method"
             --threads "$OMP_NUM_THREADS" --stop-signal "${HIST_STOP_SIGNAL:-USR2}" --out "$out" --resume)
  [ -n "${HIST_DATA:-}" ] && cmd+=(--data-dir "$HIST_DATA")
  cmd+=("$@")
  echo "hist: start $(date -u +%FT%TZ) job $job nodes ${SLURM_JOB_NUM_NODES:-1} (${SLURM_JOB_NODELIST:-?}) tasks $ntasks"
  echo "hist: ${cmd[*]}"
  if [ -n "${HIST_DRY_RUN:-}" ]; then return 0; fi
  mkdir -p "$out_dir"
  local rc=0
  "${cmd[@]}" || rc=$?
  echo "hist: end $(date -u +%FT%TZ) exit $rc"
  if [ "$rc" = 3 ]; then
    # hist-train checkpointed on the time-limit signal: run again, resuming, under the same id.
    echo "hist: checkpointed before the time limit; requeueing job $job"
    scontrol requeue "$job"
    return 0
  fi
  return "$rc"
}
