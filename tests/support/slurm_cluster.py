"""A real two-node Slurm cluster on this machine, for the launcher tests.

`munged`, `slurmctld` and two `slurmd` (node1, node2: both this host, told
apart by port) run from Debian's packages with their own configuration, state
and socket in a fresh temporary directory, so nothing in /etc is used or
changed. Missing packages are installed with apt-get (root only). Every process
the cluster starts, jobs included, carries a marker in its environment;
teardown cancels the jobs, stops the daemons and then ends whatever still
carries the marker, each by its process id.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
BINARIES = ["munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "squeue", "sinfo"]
NODES = ["node1", "node2"]
MARKER = "LCL_TEST_SLURM_CLUSTER"


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here (not root, no apt); the tests skip with this reason."""


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]


def ensure_installed() -> None:
    """Install Debian's Slurm and MUNGE packages when a binary is missing."""
    if not _missing_binaries():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm is not installed ({', '.join(_missing_binaries())} missing) "
                                 "and installing it needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("Slurm is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    if _missing_binaries():
        raise ClusterUnavailable(f"still missing after apt-get install: {', '.join(_missing_binaries())}")


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` consecutive free TCP ports (slurmd ports are given as a range)."""
    for base in range(17000, 30000, 7):
        if all(_port_pair_free(base + i) for i in range(0, count, 2)):
            return list(range(base, base + count))
    raise ClusterUnavailable("no free ports for slurmctld and slurmd")


SLURM_CONF = """\
ClusterName=lcltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
FirstJobId={first_job_id}
ReturnToService=2
KillWait=20
MinJobAge=600
InactiveLimit=0
SchedulerParameters=sched_interval=2
NodeName={nodes} NodeHostname={host} NodeAddr=127.0.0.1 Port={node_ports} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="lclslurm-"))  # short: the munge socket path has a length limit
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), MARKER: str(self.root)}
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del self.env[var]  # a cluster inside a job must not inherit the outer job's settings

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "SlurmCluster":
        self.root.chmod(0o755)  # munged wants its socket path traversable by everyone
        for sub in ("munge", "state", "run", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        ctld_port, node_port, _ = _free_ports(3)
        self.conf.write_text(SLURM_CONF.format(
            host=socket.gethostname(), root=self.root, ctld_port=ctld_port, nodes=f"node[1-{len(NODES)}]",
            node_ports=f"{node_port}-{node_port + len(NODES) - 1}", cpus=os.cpu_count() or 1,
            # Job ids pick the jobs' rendezvous ports: clusters started side by side must not share them.
            first_job_id=random.randrange(1000, 19000, 100)))
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
        for node in NODES:
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd.{node}")
        self._wait_idle(timeout=90)
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.root}/munge/munge.socket",
                     f"--key-file={key}", f"--pid-file={self.root}/run/munged.pid",
                     f"--log-file={self.root}/log/munged.log", f"--seed-file={self.root}/munge/seed"], "munged")
        self._wait(lambda: (self.root / "munge" / "munge.socket").exists(), 30, "munged to open its socket")

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}:\n" + self.logs())

    def _wait_idle(self, timeout: float) -> None:
        def idle():
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in NODES)

        self._wait(idle, timeout, "both slurmd nodes to be idle")

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, then end anything left that the cluster started; by pid."""
        if any(p.poll() is None for p in self.procs):
            self.run(["scancel", "--full", "--signal=KILL", "--user", str(os.getuid())], check=False)
            self.run(["scancel", "--user", str(os.getuid())], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.procs):  # slurmds, slurmctld, munged last
            _terminate(proc.pid, proc)
        for pid in self.marked_pids():
            _terminate(pid)
        shutil.rmtree(self.root, ignore_errors=True)

    def marked_pids(self) -> list[int]:
        """Processes (slurmstepd, job steps) whose environment carries this cluster's marker."""
        needle = f"{MARKER}={self.root}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                found.append(int(entry))
        return found

    # ------------------------------------------------------------ use

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout.strip()
        return dict(re.findall(r"(\w[\w:/]*)=(.*?)(?= \w[\w:/]*=|$)", out))

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s "
                                   f"(wanted {sorted(states)}):\n{self.logs()}")
            time.sleep(1)

    def logs(self, tail: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _terminate(pid: int, proc: subprocess.Popen | None = None, grace: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not _alive(pid):
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc is not None:
        proc.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has ended; only its parent can reap it


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running two-node cluster for the module's tests; skipped only when Slurm cannot be installed."""
    try:
        ensure_installed()
    except ClusterUnavailable as e:
        pytest.skip(str(e))
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs")
    cluster = SlurmCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()
