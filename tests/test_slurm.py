"""The Slurm templates: golden command lines, and real jobs on a private Slurm (tests/slurm)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from helpers import ROOT, TINY_MODEL, options, sample_dir

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from cluster import Cluster, available  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
VENV = Path(sys.executable).parent.parent
TINY = [*TINY_MODEL, *options(batch_size=32, local_iters=5, bn_batches=2)]

CASES = {  # golden file -> (template, nodes, tasks)
    "single_1gpu": ("single_1gpu.sbatch", 1, 1),
    "ist_2gpu": ("ist_2gpu.sbatch", 1, 2),
    "ist_4gpu": ("ist_4gpu.sbatch", 1, 4),
    "ist_8gpu": ("ist_8gpu.sbatch", 1, 8),
    "ist_8gpu_2x4": ("ist_8gpu.sbatch", 2, 8),
    "dp_4gpu": ("ist_4gpu.sbatch", 1, 4),
    "imagenet_2x4_staged": ("ist_8gpu.sbatch", 2, 8),
    "ist_8gpu_2x4_torch": ("ist_8gpu.sbatch", 2, 8),
    "ist_2gpu_usr1": ("ist_2gpu.sbatch", 1, 2),
}
# Image folders on a parallel file system: unpacked to node-local disk first.
EXTRA_ENV = {
    "imagenet_2x4_staged": {"DATASET": "imagenet", "HIST_STAGE": "/shared/imagenet.tar", "TMPDIR": "/local"},
    "ist_8gpu_2x4": {"HIST_GPU_BIND": "closest"},  # where the site's GPU binding allows it
    "ist_8gpu_2x4_torch": {"HIST_BACKEND": "torch"},  # torch.distributed: no MPI plugin
    # another warning signal, given to sbatch --signal too (the README's line); a real job gets
    # the default USR2 below, and tests/test_train.py stops a run on USR1 and resumes it exactly
    "ist_2gpu_usr1": {"HIST_STOP_SIGNAL": "USR1"},
}


def dry_run(template, nodes, tasks, method, **extra):
    # sbatch exports the template's --cpus-per-task, so the golden lines follow the template
    cpus = re.search(r"^#SBATCH --cpus-per-task=(\d+)$", (ROOT / "slurm" / template).read_text(), re.M).group(1)
    env = dict(
        os.environ,
        HIST_DRY_RUN="1",
        SLURM_NTASKS=str(tasks),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_JOB_NODELIST="node[01-0%d]" % nodes,
        SLURM_CPUS_PER_TASK=cpus,
        SLURM_SUBMIT_DIR=str(ROOT),
        HIST_VENV=str(VENV),
        DATASET="cifar100",
        METHOD=method,
        HIST_DATA="/data",
    )
    env.update(extra)
    proc = subprocess.run(
        ["bash", ROOT / "slurm" / template, "--epochs", "2"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", proc.stdout)


@pytest.mark.parametrize("name", sorted(CASES))
def test_templates_run_the_golden_command_lines(name):
    template, nodes, tasks = CASES[name]
    text = dry_run(template, nodes, tasks, "dp" if name.startswith("dp") else "ist", **EXTRA_ENV.get(name, {}))
    golden = GOLDEN / f"{name}.txt"
    if os.environ.get("HIST_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{name}: the command changed; review, then HIST_UPDATE_GOLDEN=1"


def test_templates_have_the_lines_hpc_users_expect():
    for n in (2, 4, 8):
        text = (ROOT / "slurm" / f"ist_{n}gpu.sbatch").read_text()
        for line in (
            f"#SBATCH --ntasks-per-node={n}",
            f"#SBATCH --gres=gpu:{n}",
            "#SBATCH --output=%x-%j.out",
            "#SBATCH --signal=USR2@",
            "#SBATCH --requeue",
            "#SBATCH --time=",
            "#SBATCH --cpus-per-task=",
            "set -euo pipefail",
            "# EDIT",
        ):
            assert line in text, (n, line)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = available()
    if why:
        pytest.skip(f"no private Slurm: {why}")
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def job_env(out_dir, **extra):
    env = {
        "HIST_VENV": str(VENV),
        "DATASET": "cifar10",
        "HIST_OUT_DIR": str(out_dir),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl_tcp_if_include": "lo",
        "OMPI_MCA_oob_tcp_if_include": "lo",
        "OMPI_MCA_mpi_yield_when_idle": "1",  # the 4- and 8-rank jobs share 2 cores (helpers.mpi_env)
    }
    env["HIST_DATA"] = str(sample_dir())
    env.update(extra)
    return env


def test_the_three_templates_complete_on_a_real_slurm(slurm, tmp_path, cifar_sample):
    ids = {}
    for n in (2, 4, 8):
        ids[n] = slurm.sbatch(
            "--cpus-per-task=1",
            f"--output={tmp_path}/%x-%j.out",
            f"slurm/ist_{n}gpu.sbatch",
            "--epochs",
            "0.5",
            *TINY,
            *(["--subnets", "4"] if n == 8 else []),  # ResNet-34 has 5 blocks to share
            cwd=ROOT,
            env=job_env(tmp_path),
        )
    for n, job in ids.items():
        info = slurm.wait(job, 600)
        log = (tmp_path / f"hist-{n}gpu-{job}.out").read_text()
        assert info["JobState"] == "COMPLETED", log
        assert "hist: start" in log and "hist: end" in log and "final test accuracy" in log
        with h5py.File(tmp_path / f"ist-cifar10-np{n}-{job}.h5") as f:
            assert f.attrs["world_size"] == n and f.attrs["slurm_job_id"] == job
            assert f.attrs["status"] == "completed" and len(f["evals/test_accuracy"]) >= 1


def test_the_torch_engine_runs_under_srun_without_mpi(slurm, tmp_path, cifar_sample):
    """HIST_BACKEND=torch: srun --mpi=none, the rendezvous built from Slurm's variables."""
    args = ["--cpus-per-task=1", f"--output={tmp_path}/%x-%j.out", "slurm/ist_2gpu.sbatch", "--epochs", "0.5", *TINY]
    job = slurm.sbatch(*args, cwd=ROOT, env=job_env(tmp_path, HIST_BACKEND="torch", GLOO_SOCKET_IFNAME="lo"))
    info = slurm.wait(job, 600)
    log = (tmp_path / f"hist-2gpu-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and "--mpi=none" in log and "engine     torch" in log, log
    with h5py.File(tmp_path / f"ist-cifar10-np2-{job}.h5") as f:
        assert f.attrs["engine"] == "torch" and f.attrs["status"] == "completed"


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, tmp_path, cifar_sample):
    """USR2, the templates' default (safe beside NCCL), as sbatch --signal=USR2@300 sends it.
    (Another signal through HIST_STOP_SIGNAL is a golden command line: `ist_2gpu_usr1`.)"""
    sig = "USR2"
    job = slurm.sbatch(
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%j.out",
        "slurm/ist_2gpu.sbatch",
        "--epochs",
        "1.5",  # 21 rounds: the signal comes after the third, the resumed job runs the rest
        "--checkpoint-every",
        "3",
        *TINY,
        cwd=ROOT,
        env=job_env(tmp_path),
    )
    ckpt = tmp_path / f"ist-cifar10-np2-{job}.ckpt.pt"
    deadline = time.time() + 300
    while not ckpt.exists():
        assert time.time() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(0.5)
    # what --signal=SIG@300 does before the time limit: SIG to every task of the job's steps
    slurm.cmd("scancel", f"--signal={sig}", job)
    info = slurm.wait(job, 600)
    log = (tmp_path / f"hist-2gpu-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, (info, log)
    assert "requeueing" in log and "resuming from" in log
    with h5py.File(tmp_path / f"ist-cifar10-np2-{job}.h5") as f:
        rounds = f["rounds/round"][:].tolist()
        assert rounds == list(range(len(rounds))) and f.attrs["status"] == "completed"
        assert len(f.attrs["resumed_at_round"]) >= 1


def test_a_job_whose_tasks_fail_to_launch_fails_with_one_line(slurm, tmp_path, cifar_sample):
    """srun exits 0 when every task fails to launch. A real launch fault, made the way a killed
    earlier job leaves one: its PMIx directory for this job's step is already there."""
    job = slurm.sbatch(
        "--hold",
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%j.out",
        "slurm/ist_2gpu.sbatch",
        "--epochs",
        "0.25",
        *TINY,
        cwd=ROOT,
        env=job_env(tmp_path),
    )
    (slurm.root / "tmp" / f"spmix_appdir_{os.getuid()}_{job}.0").mkdir(parents=True)
    slurm.cmd("scontrol", "release", job)
    info = slurm.wait(job, 300)
    log = (tmp_path / f"hist-2gpu-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("1:"), (info, log)
    line = next(x for x in log.splitlines() if x.startswith("hist: error:"))
    assert "srun exited 0" in line and "did not launch" in line and f"np2-{job}.h5" in line
    assert "exit 1" in log.splitlines()[-1]


def test_the_sweep_submits_runs_and_a_report(slurm, tmp_path, cifar_sample):
    sweep_dir = tmp_path / "sweep"
    env = job_env(
        sweep_dir, GPUS="1 2", METHODS="ist local-sgd dp", SWEEP_DIR=str(sweep_dir), SBATCH_ARGS="--cpus-per-task=1"
    )  # 2 process counts: the loop over counts and the single run once (the 4- and 8-rank templates run above)
    out = slurm.cmd("bash", "jobs/sweep.sh", "cifar10", "--", "--epochs", "0.25", *TINY, cwd=ROOT, env=env).stdout
    ids = re.findall(r"submitted (\d+)", out)
    assert len(ids) == 5  # 1 single + 2 GPUs x 3 methods + report
    for job in ids:
        assert slurm.wait(job, 900)["JobState"] == "COMPLETED", sweep_dir / "report.txt"
    assert len(list(sweep_dir.glob("*.h5"))) == 4
    table = (sweep_dir / "report.txt").read_text()
    for method in ("single", "ist", "local-sgd", "dp"):
        assert method in table
    for fig in ("speedup", "accuracy_vs_time", "round_breakdown", "bytes_per_round"):
        assert (sweep_dir / "report" / f"{fig}.png").stat().st_size > 5000


def test_an_image_folder_job_stages_its_data_to_node_local_disk(slurm, tmp_path, image_sample):
    archive = tmp_path / "imagewoof.tar"
    subprocess.run(["tar", "-cf", archive, "-C", image_sample, "train", "val"], check=True)
    local = tmp_path / "node-local"
    job = slurm.sbatch(
        "--cpus-per-task=2",
        f"--output={tmp_path}/%x-%j.out",
        "slurm/ist_2gpu.sbatch",
        "--epochs",
        "1",
        *options(arch="imagenet_preact_resnet34", width=0.0625, crop=64, eval_resize=73, batch_size=16, bn_batches=2),
        cwd=ROOT,
        env=job_env(tmp_path, DATASET="imagewoof", HIST_STAGE=str(archive), HIST_STAGE_DIR=str(local)),
    )
    info = slurm.wait(job, 600)
    log = (tmp_path / f"hist-2gpu-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    staged = local / f"hist-data-{job}"
    assert (staged / ".staged").is_file() and len(list((staged / "val").rglob("*.JPEG"))) == 200
    assert "--workers 1" in log  # two CPUs a task: one trains, one decodes
    with h5py.File(tmp_path / f"ist-imagewoof-np2-{job}.h5") as f:
        assert f.attrs["status"] == "completed" and f.attrs["train_images"] == 600
