"""Runs over two hosts, emulated on this machine by tools/hosts.sh (network namespaces, a
hostname each, an address each on a private bridge), their traffic over TCP, not shared memory:
mpirun through the script's rsh agent, horovodrun through an ssh on PATH that enters the host
(tools/hosts-ssh), torchrun once a host with a c10d rendezvous on the first host's address, and
a Slurm of two nodes (a slurmd in each namespace)."""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import BIN, HOROVOD_MPIRUN, ROOT, TINY_RUN, mpi_env, mpirun, options, rank_pids, run, torchrun

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from test_slurm import TINY, job_env  # noqa: E402

from cluster import Cluster, available  # noqa: E402

HOSTS = ROOT / "tools" / "hosts.sh"
pytestmark = [pytest.mark.multinode, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def two_hosts():
    """hist-h1 and hist-h2, this session's alone: the namespaces are the machine's, and a second
    test session's `down` would take them from under this one's runs, so sessions take turns."""
    with open("/tmp/hist-hosts.lock", "w") as lock:
        deadline = time.time() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    pytest.skip("another test session has held the emulated hosts for 15 minutes")
                time.sleep(1)
        proc = subprocess.run(["bash", HOSTS, "up", "2"], capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"no emulated hosts here: {proc.stderr.strip()}")
        try:
            yield ["hist-h1", "hist-h2"]
        finally:
            subprocess.run(["bash", HOSTS, "down"], capture_output=True, text=True)


def across_hosts(hosts, *args):
    """2 ranks on each host, started from the first one; MPI over the hosts' own interface."""
    line = [*HOROVOD_MPIRUN, "-np", 2 * len(hosts), "-H", ",".join(f"{h}:2" for h in hosts)]
    line += ["--mca", "plm_rsh_agent", f"{HOSTS} rsh", *args]
    return run(["bash", HOSTS, "exec", hosts[0], *line], OMPI_MCA_btl_tcp_if_include="eth0",
               OMPI_MCA_oob_tcp_if_include="eth0")  # fmt: skip


def the_run(path):
    with h5py.File(path, "r") as f:
        return f["rounds"]["loss"][:], json.loads(f.attrs["hosts"])


def weights(checkpoint):
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]


# Every method under either split, short: 4 steps a rank in 2 rounds of 2 (512 images at batch 32
# a rank: the whole set is 16 steps under full, a quarter of it 4 under shard).
RUNS = {
    (method, split): [*TINY_RUN, *options(method=method, data_split=split, local_iters=2, epochs=epochs)]
    + (["--subnets", "2"] if method == "ist" else [])
    for method in ("ist", "local-sgd", "dp")
    for split, epochs in (("full", 0.25), ("shard", 1))
}
IN_TURN = ROOT / "tests" / "parallel" / "runs_in_turn.py"


@pytest.fixture(scope="module")
def every_method(two_hosts, tmp_path_factory):
    """Each of RUNS on 2 hosts x 2 ranks, and on 4 ranks of this one host (shared memory): one
    launch a side, the runs in turn (a launch of 4 ranks costs ~10 s of startup on 2 cores, a
    run ~2 s; a run in turn equals the same run launched alone, docs/cluster.md)."""
    folder, words, paths = tmp_path_factory.mktemp("methods"), [], {}
    for (method, split), args in RUNS.items():
        name = f"{method}-{split}"
        words += ["synthetic", *args, "--log-every", "0", "--out", folder / f"{name}.{{}}.h5", "--"]
        paths[method, split] = (folder / f"{name}.hosts.h5", folder / f"{name}.one.h5")
    across_hosts(two_hosts, BIN / "python", IN_TURN, *(str(w).format("hosts") for w in words))
    mpirun(4, BIN / "python", IN_TURN, *(str(w).format("one") for w in words))
    return paths


def assert_same_run(path, one_path, hosts):
    """The same round losses and final weights, to the last bit, and each rank's host recorded."""
    (losses, seen), (one_losses, one_seen) = the_run(path), the_run(one_path)
    assert seen == [hosts[0], hosts[0], hosts[1], hosts[1]]  # the timing file names each rank's host
    assert len(set(one_seen)) == 1 and one_seen[0] not in hosts
    assert len(losses) > 1 and np.array_equal(losses, one_losses), (losses, one_losses)
    a, b = weights(path.with_suffix(".ckpt.pt")), weights(one_path.with_suffix(".ckpt.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method, split", sorted(RUNS))
def test_each_method_over_two_hosts_trains_what_one_host_trains(every_method, two_hosts, method, split):
    """2 ranks on each host: IST with 2 subnetworks of 2 ranks, each subnetwork on a host of its
    own (as the Slurm templates lay out 2 nodes x 4 GPUs), local SGD and dp, under either data
    split: the same losses and weights, to the last bit, as the same 4 ranks on one host. Open
    MPI's reductions take the same order by rank on either transport (its algorithm is chosen by
    the communicator's size and the message's, not by the link), so nothing is left to a tolerance."""
    assert_same_run(*every_method[method, split], two_hosts)


@pytest.mark.slow
def test_horovodrun_reaches_the_hosts_through_an_ssh_on_path(every_method, two_hosts, tmp_path):
    """horovodrun itself: it checks each remote host over ssh, probes the interfaces from every
    host (a task server started over ssh on each) and starts mpirun, whose remote agent is the
    first ssh on PATH; tools/hosts-ssh/ssh enters the host's namespace for all three. The run
    equals the same run on one host to the last bit."""
    out, key = tmp_path / "horovodrun.h5", ("ist", "full")
    line = [BIN / "horovodrun", "-np", 4, "-H", ",".join(f"{h}:2" for h in two_hosts), BIN / "hist-train"]
    line += ["synthetic", *RUNS[key], "--log-every", "0", "--out", out]
    path = f"{ROOT / 'tools' / 'hosts-ssh'}:{BIN}:{os.environ.get('PATH', '')}"
    run(["bash", HOSTS, "exec", two_hosts[0], *line], PATH=path, OMPI_MCA_btl_tcp_if_include="eth0",
        OMPI_MCA_oob_tcp_if_include="eth0")  # fmt: skip
    assert_same_run(out, every_method[key][1], two_hosts)


def torchrun_across_hosts(hosts, *args, port=29400):
    """One torchrun a host, 2 ranks each, meeting in a c10d rendezvous on the first host's
    address; ranks follow the hosts' names (torch sorts the nodes that joined by name)."""
    address = dict(line.split() for line in run(["bash", HOSTS, "list"]).stdout.splitlines())[hosts[0]]
    line = ["--nnodes", len(hosts), "--nproc-per-node", 2, "--rdzv-backend", "c10d"]
    line += ["--rdzv-endpoint", f"{address}:{port}", "--rdzv-id", "hist-multinode", "--no-python", *args]
    jobs = [
        subprocess.Popen(
            ["bash", HOSTS, "exec", host, BIN / "torchrun", *map(str, line)],
            env=mpi_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for host in hosts
    ]
    try:
        texts = [job.communicate(timeout=600)[0] for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    for job, text in zip(jobs, texts):
        assert job.returncode == 0, text[-4000:]
    return "".join(texts)


# Each rank says who it is, as hist-train reads it before any library starts (hist.world); one
# write, as mpirun --tag-output tags each write of an unbuffered stdout.
WHERE = (
    "import json, sys; from hist.world import world_info_from_env, torch_rendezvous; w = world_info_from_env(); "
    "sys.stdout.write('WHERE ' + json.dumps([w.rank, w.local_rank, w.host, torch_rendezvous().get('MASTER_ADDR')]) + chr(10))"
)


def where(text):
    """[(rank, local rank, host, the torch rendezvous host hist builds)] from WHERE's lines, by rank."""
    return sorted(tuple(json.loads(line)) for line in re.findall(r"WHERE (\[[^]]*\])", text))


def test_each_rank_knows_its_local_rank_and_host_under_mpirun_and_torchrun(two_hosts):
    """Local ranks count from 0 on each host (each rank's device index is its local rank's GPU)."""
    expected = [(0, 0, two_hosts[0]), (1, 1, two_hosts[0]), (2, 0, two_hosts[1]), (3, 1, two_hosts[1])]
    seen = where(across_hosts(two_hosts, BIN / "python", "-c", WHERE).stdout)
    assert [r[:3] for r in seen] == expected and {r[3] for r in seen} == {None}
    seen = where(torchrun_across_hosts(two_hosts, BIN / "python", "-c", WHERE, port=29401))
    assert [r[:3] for r in seen] == expected and {r[3] for r in seen} == {None}  # torchrun set it


@pytest.mark.slow
def test_torchrun_over_two_hosts_trains_what_one_host_trains(every_method, two_hosts, tmp_path):
    """IST under the torch engine (Gloo over the hosts' TCP): the same to the last bit as
    torchrun's 4 ranks on one host. Against Horovod's run the weights differ by rounding only:
    a 4-rank average is a sum of 4 in Gloo's ring order there and in Open MPI's order here (at 2
    ranks, a sum of 2, the engines agree to the bit: tests/test_torch_engine.py)."""
    key = ("ist", "full")
    train = [BIN / "hist-train", "synthetic", *RUNS[key], "--log-every", "0"]
    torchrun_across_hosts(two_hosts, *train, "--out", tmp_path / "hosts.h5")
    torchrun(4, *train, "--out", tmp_path / "one.h5")
    assert_same_run(tmp_path / "hosts.h5", tmp_path / "one.h5", two_hosts)
    a, b = weights(tmp_path / "hosts.ckpt.pt"), weights(every_method[key][1].with_suffix(".ckpt.pt"))
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-4) for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # if this starts to hold, the docstring is wrong
    with h5py.File(tmp_path / "hosts.h5", "r") as f:
        assert f.attrs["engine"] == "torch"


def test_hosts_sh_is_idempotent_and_names_each_host(two_hosts):
    again = run(["bash", HOSTS, "up", "2"])
    assert again.stdout.split() == ["hist-h1", "10.77.0.2", "hist-h2", "10.77.0.3"]
    seen = run(["bash", HOSTS, "exec", "hist-h2", "sh", "-c", "hostname; cat /etc/hosts"]).stdout.split()
    assert seen[0] == "hist-h2" and "10.77.0.2" in seen and "hist-h1" in seen
    bad = run(["bash", HOSTS, "exec", "hist-h9", "true"], check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no host 'hist-h9'" in bad.stderr


@pytest.mark.slow
def test_a_host_lost_mid_run_ends_the_other_host_and_the_run_resumes(two_hosts, tmp_path):
    """Every process of the second host SIGKILLed after the first checkpoint: the first host's
    ranks end within 60 s with mpirun's line on the lost daemon, the checkpoint is whole, and the
    same 4 ranks on one host resume from it to the end."""
    out = tmp_path / "lost.h5"
    train = [BIN / "hist-train", "synthetic", *TINY_RUN, *options(method="ist", subnets=2, epochs=4)]
    line = [*HOROVOD_MPIRUN, "-np", 4, "-H", ",".join(f"{h}:2" for h in two_hosts)]
    line += ["--mca", "plm_rsh_agent", f"{HOSTS} rsh", *train, "--checkpoint-every", "1", "--out", out]
    env = mpi_env(OMPI_MCA_btl_tcp_if_include="eth0", OMPI_MCA_oob_tcp_if_include="eth0")
    job = subprocess.Popen(["bash", HOSTS, "exec", two_hosts[0], *map(str, line)], env=env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    checkpoint = tmp_path / "lost.ckpt.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and job.poll() is None:
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    assert job.poll() is None, "the run ended before the host was lost: " + job.stdout.read()[-2000:]
    lost = time.time()
    pids = subprocess.run(["ip", "netns", "pids", two_hosts[1]], capture_output=True, text=True).stdout.split()
    subprocess.run(["kill", "-9", *pids])
    try:
        text, _ = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        raise AssertionError("the first host's ranks still ran 60 s after the second host was lost")
    assert job.returncode != 0 and time.time() - lost < 60
    # Open MPI says it one of two ways, whichever it notices first: the lost connection (naming
    # the host), or the exit of its remote-shell agent for that host (a "daemon" failure, unnamed)
    assert "hist-h2" in text or "unable to reliably start one or more daemons" in text, text[-2000:]
    while rank_pids(out):  # the first host's ranks are gone before the resume takes the run lock
        assert time.time() - lost < 90
        time.sleep(0.1)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # whole: it loads
    mpirun(4, *train, "--checkpoint-every", "1", "--out", out, "--resume")
    with h5py.File(out, "r") as f:
        rounds = f["rounds"]["round"][:]
        assert f.attrs["status"] == "completed" and list(rounds) == list(range(len(rounds)))
        assert state["round"] in list(f.attrs["resumed_at_round"])


@pytest.fixture(scope="module")
def two_node_slurm(two_hosts, tmp_path_factory):
    """The private Slurm (tests/slurm) with a node on each host: a slurmd in each namespace."""
    why = available()
    if why:
        pytest.skip(f"no private Slurm: {why}")
    cluster = Cluster(tmp_path_factory.mktemp("slurm2"), gpus=4, cpus=16, hosts=two_hosts)
    try:  # a daemon that fails to start must not leave the others running
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.slurm
def test_a_two_node_job_stages_once_a_node_and_resumes_after_the_time_limit_signal(
    two_node_slurm, two_hosts, tmp_path, cifar_sample
):
    """sbatch --nodes=2 --ntasks-per-node=2 slurm/ist_4gpu.sbatch with HIST_STAGE: the archive
    unpacked once on each node into its own node-local folder (a requeued run finds it there), the
    time-limit warning delivered to the tasks of both nodes, the job requeued, and the resumed
    job ends with every round in its file once; a subnetwork on each node (Slurm's block layout)."""
    slurm = two_node_slurm
    archive = tmp_path / "cifar.tar"
    subprocess.run(["tar", "-cf", archive, "-C", cifar_sample, "cifar-10-batches-py"], check=True)
    local = slurm.root / "node-local" / "stage"  # each node's own (tests/slurm/cluster.py)
    env = job_env(tmp_path, HIST_STAGE=str(archive), HIST_STAGE_DIR=str(local),
                  OMPI_MCA_btl_tcp_if_include="eth0", OMPI_MCA_oob_tcp_if_include="eth0")  # fmt: skip
    job = slurm.sbatch(
        "--nodes=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        f"--output={tmp_path}/%x-%j.out",
        "slurm/ist_4gpu.sbatch",
        *["--epochs", "0.5", "--checkpoint-every", "1", "--subnets", "2", *TINY],  # 4 rounds
        cwd=ROOT,
        env=env,
    )
    ckpt, log = tmp_path / f"ist-cifar10-np4-{job}.ckpt.pt", tmp_path / f"hist-4gpu-{job}.out"
    deadline = time.time() + 300
    while not ckpt.exists():
        info = slurm.job(job)
        assert time.time() < deadline and info["JobState"] in ("PENDING", "RUNNING"), (info, log.read_text())
        time.sleep(0.5)
    staged = {h: slurm.root / "nodes" / h / "stage" / f"hist-data-{job}" / ".staged" for h in two_hosts}
    first = {h: path.stat().st_mtime_ns for h, path in staged.items()}
    slurm.cmd("scancel", "--signal=USR2", job)  # what --signal=USR2@300 does before the time limit
    info = slurm.wait(job, 600)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, (info, text)
    assert "nodes 2 (hist-h[1-2]) tasks 4" in text and "requeueing" in text and "resuming from" in text
    with h5py.File(tmp_path / f"ist-cifar10-np4-{job}.h5") as f:
        rounds = f["rounds/round"][:].tolist()
        assert rounds == list(range(len(rounds))) and f.attrs["status"] == "completed"
        assert len(f.attrs["resumed_at_round"]) >= 1
        assert json.loads(f.attrs["hosts"]) == [two_hosts[0]] * 2 + [two_hosts[1]] * 2
    # once a node: each node's own copy, not unpacked again by the requeued job
    assert {h: path.stat().st_mtime_ns for h, path in staged.items()} == first
    assert not local.exists()  # the shared path itself holds nothing: the copies are node-local
    # srun's tasks: local ranks per node, and the torch engine's rendezvous on the first node
    seen = where(
        slurm.cmd(
            "srun", "--nodes=2", "--ntasks-per-node=2", "--mpi=none", BIN / "python", "-c", WHERE, cwd=ROOT
        ).stdout
    )
    assert seen == [(0, 0, two_hosts[0], two_hosts[0]), (1, 1, two_hosts[0], two_hosts[0]),
                    (2, 0, two_hosts[1], two_hosts[0]), (3, 1, two_hosts[1], two_hosts[0])]  # fmt: skip
    for h in two_hosts:  # the warning reached both tasks on each node (slurmstepd's own account)
        sent = re.findall(
            r"Sending signal 12 to pid \d+ \(hist-train\)", (slurm.root / "log" / f"slurmd.{h}.log").read_text()
        )
        assert len(sent) == 2, slurm.logs()
