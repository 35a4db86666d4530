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
# Image folders (imagenet, imagewoof, ...): each task gets --cpus-per-task CPUs; one drives the
# training, the others decode (--workers, HIST_WORKERS to choose). Reading millions of small files
# from a parallel file system is slow: HIST_STAGE=/shared/imagenet.tar (a tar holding train/ and
# val/ at its top) is unpacked once per node onto node-local disk (HIST_STAGE_DIR, default
# $TMPDIR or /tmp) before training, and the run reads it from there.
# CPUs: since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch, so each task
# would be bound to one core while it starts its decoding workers; the srun line passes it on.
# HIST_GPU_BIND=closest adds --gpu-bind=closest (each task on the GPU nearest its CPUs) where
# the site's GPU binding allows it.
# HIST_BACKEND=torch runs the torch.distributed engine instead (no Horovod, no MPI): srun
# --mpi=none, still one task per GPU, and hist-train builds its rendezvous from Slurm's variables
# (the first host of the allocation, a port from the job id). HIST_BACKEND=horovod or unset: MPI.
# Arguments after the template name go to hist-train: sbatch slurm/ist_2gpu.sbatch --epochs 2

# "yes" if the timing file $2 was written at or after time $1 (seconds) and says the run
# stopped early (status interrupted: checkpointed on the signal), else "no".
hist_stopped_since() {
  local when
  when=$(stat -c %Y "$2" 2>/dev/null) || { echo no; return; }
  [ "$when" -ge "$1" ] || { echo no; return; }
  python -c 'import sys, h5py; print("yes" if h5py.File(sys.argv[1], "r").attrs.get("status") == "interrupted" else "no")' "$2" 2>/dev/null || echo no
}

hist_slurm_run() {
  local dataset=${DATASET:-cifar10} method=${METHOD:-ist} out_dir=${HIST_OUT_DIR:-runs}
  local ntasks=${SLURM_NTASKS:?run this inside a Slurm allocation (sbatch)}
  local job=${SLURM_JOB_ID:?no SLURM_JOB_ID}
  export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
  local workers=${HIST_WORKERS:-$((OMP_NUM_THREADS > 1 ? OMP_NUM_THREADS - 1 : 0))}
  local data=${HIST_DATA:-}
  local stage=()
  if [ -n "${HIST_STAGE:-}" ]; then
    data="${HIST_STAGE_DIR:-${TMPDIR:-/tmp}}/hist-data-$job"
    # One task per node unpacks the archive; a requeued job (same id) finds it already there.
    # The first node says how far it is, every ~100 MB (GNU tar's checkpoints), against the size.
    local size
    size=$(du -h "$HIST_STAGE" 2>/dev/null | cut -f1 || true)
    stage=(srun --ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" --kill-on-bad-exit=1 bash -c
           "mkdir -p '$data' && { [ -f '$data/.staged' ] || { p=(); [ \"\${SLURM_NODEID:-0}\" = 0 ] && p=(--checkpoint=10000 --checkpoint-action=echo='hist: staging %T of ${size:-?}'); tar -xf '$HIST_STAGE' -C '$data' \"\${p[@]}\" && touch '$data/.staged'; }; }")
  fi
  local tag=$method
  [ "$ntasks" = 1 ] && tag=single
  # The job id names the file, so a requeued job (same id) continues the same file.
  local out="$out_dir/${tag}-${dataset}-np${ntasks}-${job}.h5"
  local backend=${HIST_BACKEND:-} mpi=pmix
  case "$backend" in
    torch) mpi=none ;;
    "" | horovod | auto) ;;
    *) echo "hist: error: HIST_BACKEND=$backend: choose horovod or torch"; return 2 ;;
  esac
  local cmd=(srun --mpi="$mpi" --kill-on-bad-exit=1 --cpus-per-task="$OMP_NUM_THREADS")
  [ -n "${HIST_GPU_BIND:-}" ] && cmd+=(--gpu-bind="$HIST_GPU_BIND")
  cmd+=(hist-train "$dataset" --method "$method"
             --threads "$OMP_NUM_THREADS" --workers "$workers" --stop-signal "${HIST_STOP_SIGNAL:-USR2}"
             --out "$out" --resume)
  [ -n "$backend" ] && cmd+=(--backend "$backend")
  [ -n "$data" ] && cmd+=(--data-dir "$data")
  cmd+=("$@")
  echo "hist: start $(date -u +%FT%TZ) job $job nodes ${SLURM_JOB_NUM_NODES:-1} (${SLURM_JOB_NODELIST:-?}) tasks $ntasks"
  [ ${#stage[@]} -gt 0 ] && echo "hist: stage: ${stage[*]}"
  echo "hist: ${cmd[*]}"
  if [ -n "${HIST_DRY_RUN:-}" ]; then return 0; fi
  mkdir -p "$out_dir"
  if [ ${#stage[@]} -gt 0 ]; then
    "${stage[@]}" || { echo "hist: could not unpack HIST_STAGE=$HIST_STAGE into $data on every node"; return 2; }
  fi
  local rc=0 started
  started=$(date +%s)
  "${cmd[@]}" || rc=$?
  if [ "$rc" != 0 ] && [ "$rc" != 3 ] && [ "$(hist_stopped_since "$started" "$out")" = yes ]; then
    # On several nodes the first task to exit 3 ends the step (--kill-on-bad-exit) while the
    # others are still exiting, and srun reports their signal instead. The timing file, whole
    # before any rank exits, says whether this run stopped on the signal with its checkpoint.
    rc=3
  fi
  if [ "$rc" = 0 ] && [ ! -e "$out" ]; then
    # srun exits 0 when its tasks fail to launch (a PMIx or cgroup fault on the node): say so
    echo "hist: error: srun exited 0 but no task wrote $out: the tasks did not launch; see srun's errors above and slurmd's log on ${SLURM_JOB_NODELIST:-the node}"
    rc=1
  fi
  echo "hist: end $(date -u +%FT%TZ) exit $rc"
  if [ "$rc" = 3 ]; then
    # hist-train checkpointed on the time-limit signal: run again, resuming, under the same id.
    echo "hist: checkpointed before the time limit; requeueing job $job"
    scontrol requeue "$job"
    return 0
  fi
  return "$rc"
}
