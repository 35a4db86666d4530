"""Runs over two hosts, emulated on this machine by tools/hosts.sh (network namespaces, a
hostname each, an address each on a private bridge): Open MPI starts the second host's ranks
through the script's rsh agent, and their traffic crosses hosts over TCP, not shared memory."""

import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch

from helpers import BIN, HOROVOD_MPIRUN, ROOT, TINY_RUN, mpi_env, mpirun, options, rank_pids, run

HOSTS = ROOT / "tools" / "hosts.sh"
pytestmark = [pytest.mark.multinode, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def two_hosts():
    proc = subprocess.run(["bash", HOSTS, "up", "2"], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"no emulated hosts here: {proc.stderr.strip()}")
    yield ["hist-h1", "hist-h2"]
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
    ranks end within 60 s with a line naming the lost host, the checkpoint is whole, and the
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
    assert "hist-h2" in text, text[-2000:]  # the line that names the lost host
    while rank_pids(out):  # the first host's ranks are gone before the resume takes the run lock
        assert time.time() - lost < 90
        time.sleep(0.1)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # whole: it loads
    mpirun(4, *train, "--checkpoint-every", "1", "--out", out, "--resume")
    with h5py.File(out, "r") as f:
        rounds = f["rounds"]["round"][:]
        assert f.attrs["status"] == "completed" and list(rounds) == list(range(len(rounds)))
        assert state["round"] in list(f.attrs["resumed_at_round"])
