"""A private single-node Slurm for the tests: munged, slurmctld and slurmd on loopback only.

Everything (key, sockets, state, spool, logs, pid files, fake GPU device files) lives in
one temporary folder; the daemons run in the foreground of child processes and are stopped
by PID. The node advertises 32 CPUs and 8 GPUs (character devices made with mknod c 1 3, so
Slurm keeps them) whatever the machine has, so the real GPU templates run unchanged; Slurm
then sets CUDA_VISIBLE_DEVICES and hist-train falls back to the CPU.

With `hosts` (names of hosts that tools/hosts.sh brought up) it is a cluster of those nodes:
one slurmd in each host's namespace (`slurmd -N host`, with a node-local folder of its own: the
cluster's `node-local` path bound to `nodes/<host>` in that slurmd's mount namespace, so what a
job writes there stays on its node, as /tmp does on a cluster), slurmctld on the first host,
munged on this machine (its socket is a file every namespace sees), and every command run on
the first host, the only place the controller's address is reached from.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
HOSTS = Path(__file__).resolve().parents[2] / "tools" / "hosts.sh"


def available() -> str | None:
    """None if a private Slurm can start here, else why not."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"missing {', '.join(missing)} (make test installs them with apt)"
    if os.geteuid() != 0:
        return "the private Slurm runs its daemons as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cgroups() -> str:
    """Commands that mount at /sys/fs/cgroup what slurmd needs to find there: cgroup v2 where
    this machine has it, else v1's tmpfs with the named systemd hierarchy slurmd checks for."""
    with open("/proc/self/mounts") as f:
        kind = next((line.split()[2] for line in f if line.split()[1] == "/sys/fs/cgroup"), "tmpfs")
    if kind == "cgroup2":
        return "mount -t cgroup2 none /sys/fs/cgroup"
    return "mount -t tmpfs cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd"


class Cluster:
    def __init__(self, root: Path, gpus: int = 8, cpus: int = 32, hosts: list[str] | None = None):
        """`gpus` and `cpus` are each node's; `hosts`: emulated hosts, one node each (else this machine)."""
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.nodes = {self.host: "127.0.0.1"}
        self.on_first: list[str] = []  # what runs a command on the controller's host
        if hosts:
            listed = subprocess.run(["bash", HOSTS, "list"], capture_output=True, text=True, check=True).stdout
            up = dict(line.split() for line in listed.splitlines())
            self.nodes = {h: up[h] for h in hosts}
            self.host, self.on_first = hosts[0], ["bash", str(HOSTS), "exec", hosts[0]]
        self.procs: list[subprocess.Popen] = []
        for d in ("state", "spool", "log", "run", "dev", "tmp", "node-local"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for node in self.nodes if hosts else ():
            (root / "nodes" / node / "tmp").mkdir(parents=True, exist_ok=True)
            (root / "spool" / node).mkdir(parents=True, exist_ok=True)
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.gpus, self.cpus = gpus, cpus

    def _write_config(self) -> None:
        r = self.root
        for i in range(self.gpus):
            dev = r / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
        names = ",".join(self.nodes)
        (r / "gres.conf").write_text(f"NodeName={names} Name=gpu File={r}/dev/nvidia[0-{self.gpus - 1}]\n")
        many = len(self.nodes) > 1  # then each slurmd has files of its own (%n: its node name)
        each = ".%n" if many else ""
        nodes = "\n".join(
            f"NodeName={name} NodeAddr={address} CPUs={self.cpus} Boards=1 SocketsPerBoard=1 "
            f"CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory=16000 Gres=gpu:{self.gpus} State=UNKNOWN"
            for name, address in self.nodes.items()
        )
        self.conf.write_text(f"""ClusterName=histtest
SlurmctldHost={self.host}({self.nodes[self.host]})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/run/munge.sock,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{"/%n" if many else ""}
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd{each}.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd{each}.log
{"SlurmdDebug=debug" if many else ""}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=pmix
# PMIx's per-step directories (spmix_appdir_UID_JOB.STEP) under this cluster's own tmp: job ids
# restart at 1 in every test cluster, and a killed earlier one's directories would fail the launch;
# with several nodes, each node's own (node-local), as two nodes' steps have the same directory names
TmpFS={r}/{"node-local/tmp" if many else "tmp"}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
GresTypes=gpu
ReturnToService=2
# cred_expire above: a requeued job waits this long (default 120 s) before it may start again
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# a pass a second (defaults: backfill every 30 s, the main loop every 60 s): a requeued job, or one
# whose dependency just ended, starts within a second of being eligible instead of up to 30 s later
SchedulerParameters=bf_interval=1,sched_interval=1
MinJobAge=600
KillWait=5
InactiveLimit=0
{nodes}
PartitionName=debugq Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 60) -> "Cluster":
        r = self.root
        self._write_config()
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={r}/run/munge.sock",
                f"--key-file={key}",
                f"--pid-file={r}/run/munged.pid",
                f"--log-file={r}/log/munged.log",
                f"--seed-file={r}/run/munge.seed",
            ],
            "munged",
        )
        self._wait(lambda: (r / "run" / "munge.sock").exists(), timeout, "munged")
        self._spawn([*self.on_first, "slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        if not self.on_first:
            self._spawn(["slurmd", "-D", "-f", str(self.conf)], "slurmd")
        for node in self.nodes if self.on_first else ():
            # in the host's namespace, with its own node-local folder (a mount of its own), and the
            # cgroup file system slurmd looks for (`ip netns exec` gives a fresh /sys without it)
            local = f"{_cgroups()} && mount --bind {r}/nodes/{node} {r}/node-local && exec slurmd -D -N {node} -f {self.conf}"
            self._spawn(["bash", HOSTS, "exec", node, "unshare", "--mount", "--propagation", "private",
                         "sh", "-c", local], f"slurmd.{node}")  # fmt: skip
        states = lambda: self.cmd("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()  # noqa: E731
        self._wait(lambda: states() == ["idle"] * len(self.nodes), timeout, "every slurmd idle")
        return self

    def _spawn(self, cmd, name) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(list(map(str, cmd)), env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, ready, timeout, what) -> None:
        deadline = time.time() + timeout
        while not ready():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited {p.returncode}; logs in {self.root}/log: {self.logs()}")
            if time.time() > deadline:
                raise RuntimeError(f"timed out waiting for {what}; logs: {self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        return "\n".join(f"== {f.name}\n{f.read_text()[-2000:]}" for f in sorted((self.root / "log").glob("*")))

    def cmd(self, *args, check=True, cwd=None, env=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*self.on_first, *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**self.env, **(env or {})},
            timeout=120,
        )
        if check and proc.returncode:
            raise RuntimeError(f"{args} exited {proc.returncode}: {proc.stderr}")
        return proc

    def sbatch(self, *args, cwd=None, env=None) -> str:
        out = self.cmd("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict:
        text = self.cmd("scontrol", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float = 600) -> dict:
        """Poll every second (sbatch --wait polls only at 2, 10 and 42 s)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
                "PREEMPTED",
                "BOOT_FAIL",
                "DEADLINE",
            ):
                return info
            time.sleep(1)
        self.cmd("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
