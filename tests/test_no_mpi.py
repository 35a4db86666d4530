"""One process needs neither Horovod nor MPI: a workstation, a laptop, a login node.

The imports are made to fail for real (a `sitecustomize` that refuses `horovod` and `mpi4py`
before anything else runs), and a real one-process training runs to its end."""

import json
import os

import h5py
import pytest
import torch

from helpers import BIN, TINY_MODEL, options, run

BLOCKER = '''
import sys

class _Refuse:
    """No Horovod and no MPI on this machine."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("horovod", "mpi4py"):
            raise ImportError(f"No module named {name!r} (refused by the test)")
        return None

sys.meta_path.insert(0, _Refuse())
'''


@pytest.fixture
def no_mpi(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_the_blocker_really_refuses_both_imports(no_mpi):
    probe = "import importlib\nfor m in ('horovod.torch', 'mpi4py'):\n    try:\n        importlib.import_module(m)\n        print('imported', m)\n    except ImportError:\n        print('refused', m)"
    proc = run([BIN / "python", "-c", probe], **no_mpi)
    assert proc.stdout.split() == ["refused", "horovod.torch", "refused", "mpi4py"]


@pytest.mark.slow
def test_one_process_trains_checkpoints_and_resumes_without_horovod_or_mpi(tmp_path, no_mpi):
    out = tmp_path / "single.h5"
    args = [BIN / "hist-train", "synthetic", *TINY_MODEL, *options(epochs=2, batch_size=32, synthetic_size=256)]
    args += [*options(local_iters=4, threads=1, bn_batches=2, eval_every_epochs=1, checkpoint_every=2)]
    args += ["--method", "ist", "--out", out]
    proc = run(args, **no_mpi)
    assert "final test accuracy" in proc.stdout and "Traceback" not in proc.stderr
    with h5py.File(out) as f:
        versions = json.loads(f.attrs["versions"])
        assert f.attrs["status"] == "completed" and len(f["evals"]["round"]) == 2
    assert versions["mpi"].startswith("none") and versions["horovod"] is None
    # the processor is named, since another processor's kernels round differently
    assert versions["cpu"] and versions["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    proc = run([*args, "--resume"], **no_mpi)  # the finished checkpoint reads back
    assert "already at the last round" in proc.stdout
