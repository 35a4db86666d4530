#!/usr/bin/env bash
# The first things a GPU user hits, in one command (at most ~8 minutes on one GPU):
#   tools/gpu-check.sh               on the GPU (CUDA)
#   tools/gpu-check.sh --device cpu  the same checks on the CPU (CI runs this)
# Prints one JSON object (each check, its figures, the error line where one fails); exit 0
# when every check passes. Needs torch and h5py only (Pillow for the image-folder checks);
# Horovod, MPI and click are used where present. Options: --out DIR keeps the runs' files,
# --only NAME runs the checks whose names contain NAME, --jobs N runs N checks at once (a CPU's cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${HIST_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=$(command -v python3 || command -v python); fi
fi
export PATH="$(dirname "$python"):$PATH"
exec "$python" "$root/tools/gpu_check.py" "$@"
