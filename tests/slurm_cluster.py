"""A real SLURM cluster on this one machine, for the tests of ``slurm/``.

``SlurmCluster`` starts munged, slurmctld and one slurmd per emulated host. The hosts are network
namespaces (``lnode1``, ``lnode2``, ...) joined to the root namespace by veth pairs
(``10.233.<i>.1`` outside, ``10.233.<i>.2`` inside) and named in /etc/hosts, so a job spans
two "machines" with their own addresses and host names: srun, the job steps and
torch.distributed talk over real sockets as on a cluster. The controller listens on the
root-side addresses.

Everything the cluster writes (munge key and socket, slurm.conf, state, spool, logs) lies in
one work folder; the daemons are stopped by their PID, the namespaces and veths are deleted,
and /etc/hosts and ``net.ipv4.ip_forward`` are restored on exit, also after a failure.

Needs root, the Debian packages ``slurmctld slurmd slurm-client munge iproute2``
(``make slurm-deps``) and network namespaces. :func:`missing_requirements` says what is
missing; the pytest fixture skips with that reason.

    with SlurmCluster(Path("/tmp/work")) as cluster:
        job = cluster.sbatch(["--nodes=2", "script.sh"], env=...)
        cluster.wait_for(job, {"COMPLETED"})
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun", "ip", "nsenter", "unshare")
# Ports of this test cluster, away from a system SLURM's defaults (6817, 6818).
CTLD_PORT = 16817
SLURMD_PORT = 16818
LOCK_FILE = Path("/run/lock/leffa-slurm-test.lock")
HOSTS_FILE = Path("/etc/hosts")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
HOSTS_MARK = "# leffa slurm test"
# Job states after which a job runs no more (without a requeue).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def missing_requirements() -> str | None:
    """Why a cluster cannot be started here, or None when it can (the namespace check is
    done by :meth:`SlurmCluster.start`)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the SLURM test cluster needs root (network namespaces, /etc/hosts, slurmd)"
    missing = [name for name in DAEMONS + COMMANDS if _which(name) is None]
    if missing:
        return (f"SLURM test cluster: {', '.join(missing)} not found "
                "(make slurm-deps installs slurmctld slurmd slurm-client munge iproute2)")
    return None


class ClusterUnavailable(RuntimeError):
    """The machine cannot host the test cluster (not a failure of the code under test)."""


class SlurmCluster:
    """A controller and ``len(nodes)`` compute nodes of ``cpus`` CPUs each (see module doc)."""

    def __init__(self, workdir: Path, nodes: tuple[str, ...] = ("lnode1", "lnode2"), cpus: int = 1,
                 partition: str = "debug"):
        self.workdir = Path(workdir)
        self.nodes = tuple(nodes)
        self.cpus = cpus
        self.partition = partition
        self.controller = socket.gethostname().split(".")[0]
        self.conf = self.workdir / "slurm.conf"
        self.munge_socket = self.workdir / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for name in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if name != "SLURM_CONF":
                del self.env[name]
        self._procs: dict[str, subprocess.Popen] = {}
        self._netns: list[str] = []
        self._veths: list[str] = []
        self._hosts_original: str | None = None
        self._ip_forward_original: str | None = None
        self._lock = None

    # ---------------------------------------------------------------- addresses

    def node_address(self, index: int) -> str:
        return f"10.233.{index + 1}.2"

    def gateway_address(self, index: int) -> str:
        return f"10.233.{index + 1}.1"

    # ---------------------------------------------------------------- start / stop

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        reason = missing_requirements()
        if reason:
            raise ClusterUnavailable(reason)
        self._acquire_lock()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._make_network()
        self._edit_hosts()
        self._write_conf()
        self._start_slurmctld()
        for node in self.nodes:
            self._start_slurmd(node)
        self._wait_idle(timeout)

    def stop(self) -> None:
        """Stop everything this cluster started; each step runs even when an earlier one fails."""
        steps = [self._cancel_jobs, self._kill_namespace_processes, self._stop_daemons,
                 self._remove_network, self._restore_hosts, self._release_lock]
        for step in steps:
            try:
                step()
            except Exception as error:  # keep cleaning up
                print(f"slurm cluster cleanup: {step.__name__}: {error!r}")

    # ---------------------------------------------------------------- commands

    def run(self, *args: str, check: bool = True, timeout: float = 30.0, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; returns the completed process."""
        result = subprocess.run(list(args), env=env or self.env, cwd=cwd, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    def job_env(self, **variables: str) -> dict:
        """The environment for a submission: this cluster's SLURM_CONF plus ``variables``."""
        return dict(self.env, **variables)

    def show_job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, NodeList, Restarts, StartTime, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout.strip()
        return parse_scontrol(out)

    def wait_for(self, job_id: str, states: set[str], timeout: float, poll: float = 1.0,
                 until=None) -> dict[str, str]:
        """Poll the job until its state is in ``states`` (or ``until(job)`` is true); returns
        the job's record. Raises TimeoutError with the record and logs' tails otherwise."""
        deadline = time.monotonic() + timeout
        job: dict[str, str] = {}
        while time.monotonic() < deadline:
            job = self.show_job(job_id)
            state = job.get("JobState", "")
            if state in states or (until is not None and until(job)):
                return job
            if state in FINISHED and state not in states:
                raise RuntimeError(f"job {job_id} ended {state}, expected {sorted(states)}: {job}\n"
                                   + self.diagnostics())
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not {sorted(states)} after {timeout:.0f} s: {job}\n"
                           + self.diagnostics())

    def diagnostics(self, lines: int = 30) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for log in sorted(self.workdir.glob("log/*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    # ---------------------------------------------------------------- internals

    def _acquire_lock(self, timeout: float = 900.0) -> None:
        # One test cluster per machine at a time (namespace names, ports and /etc/hosts are shared).
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK_FILE, "w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    self._lock = None
                    raise ClusterUnavailable(f"another SLURM test cluster holds {LOCK_FILE}")
                time.sleep(1)

    def _release_lock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _spawn(self, name: str, args: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.workdir / "log" / f"{name}.out", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
        log.close()
        self._procs[name] = proc
        return proc

    def _start_munge(self) -> None:
        (self.workdir / "log").mkdir(exist_ok=True)
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # munged runs as root here (--force): its files are in a root-only folder of the work dir
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force",
            f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={self.workdir / 'log' / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        ])
        self._wait_path(self.munge_socket, 10, "munged")

    def _make_network(self) -> None:
        ip = _which("ip")
        self._ip_forward_original = IP_FORWARD.read_text().strip()
        for i, node in enumerate(self.nodes):
            if Path(f"/var/run/netns/{node}").exists():
                # a namespace left over by an interrupted run of this test (it holds nothing else)
                subprocess.run([ip, "netns", "delete", node], capture_output=True)
            outside, inside = f"{node}-h", f"{node}-n"
            subprocess.run([ip, "link", "delete", outside], capture_output=True)
            result = subprocess.run([ip, "netns", "add", node], capture_output=True, text=True)
            if result.returncode != 0:
                raise ClusterUnavailable(f"cannot create network namespace {node}: {result.stderr.strip()}")
            self._netns.append(node)
            commands = [
                [ip, "link", "add", outside, "type", "veth", "peer", "name", inside],
                [ip, "link", "set", inside, "netns", node],
                [ip, "addr", "add", f"{self.gateway_address(i)}/24", "dev", outside],
                [ip, "link", "set", outside, "up"],
                [ip, "-n", node, "addr", "add", f"{self.node_address(i)}/24", "dev", inside],
                [ip, "-n", node, "link", "set", inside, "up"],
                [ip, "-n", node, "link", "set", "lo", "up"],
                [ip, "-n", node, "route", "add", "default", "via", self.gateway_address(i)],
            ]
            for command in commands:
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise ClusterUnavailable(f"{' '.join(command)}: {result.stderr.strip()}")
                if command[1:3] == ["link", "add"]:
                    self._veths.append(outside)
        # node to node traffic (srun, torch.distributed) goes through the root namespace
        IP_FORWARD.write_text("1\n")

    def _remove_network(self) -> None:
        ip = _which("ip") or "ip"
        for node in reversed(self._netns):
            subprocess.run([ip, "netns", "delete", node], capture_output=True)
        self._netns.clear()
        for veth in self._veths:  # deleting the namespace removes the pair; this is for the rest
            subprocess.run([ip, "link", "delete", veth], capture_output=True)
        self._veths.clear()
        if self._ip_forward_original is not None:
            IP_FORWARD.write_text(self._ip_forward_original + "\n")
            self._ip_forward_original = None

    def _edit_hosts(self) -> None:
        original = HOSTS_FILE.read_text()
        lines = original.splitlines()
        kept = [line for line in lines if not line.endswith(HOSTS_MARK)]
        # the lines of an interrupted earlier run are dropped; otherwise the file is kept as it is
        self._hosts_original = original if kept == lines else "\n".join(kept) + "\n"
        base = self._hosts_original
        if base and not base.endswith("\n"):
            base += "\n"
        entries = [f"{self.node_address(i)} {node} {HOSTS_MARK}" for i, node in enumerate(self.nodes)]
        # written in place: /etc/hosts may be a mount point that cannot be replaced
        with open(HOSTS_FILE, "w") as f:
            f.write(base + "\n".join(entries) + "\n")

    def _restore_hosts(self) -> None:
        if self._hosts_original is not None:
            with open(HOSTS_FILE, "w") as f:
                f.write(self._hosts_original)
            self._hosts_original = None

    def _write_conf(self) -> None:
        d = self.workdir
        for sub in ("state", "spool", "log", "tmp"):
            (d / sub).mkdir(exist_ok=True)
        plugstack = d / "plugstack.conf"
        plugstack.write_text("")
        lines = [
            "ClusterName=leffatest",
            f"SlurmctldHost={self.controller}({self.gateway_address(0)})",
            f"SlurmctldPort={CTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it may start again (120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin",
            # a pass over the pending jobs every 2 s, not 60: a requeued job becomes eligible
            # (cred_expire) with no event that would start a pass
            "SchedulerParameters=sched_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "JobRequeue=1",
            # keep finished jobs' records for `scontrol show job` (there is no accounting database)
            "MinJobAge=3600",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "MessageTimeout=10",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",
            f"TmpFS={d / 'tmp'}",
            f"PlugStackConfig={plugstack}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for i, node in enumerate(self.nodes):
            lines.append(f"NodeName={node} NodeAddr={self.node_address(i)} CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)], env=self.env)

    def _start_slurmd(self, node: str) -> None:
        # nsenter and unshare exec without forking: the Popen's PID is slurmd's. Not
        # `ip netns exec`, which remounts /sys (slurmd then fails on cgroups).
        (self.workdir / "spool" / node).mkdir(parents=True, exist_ok=True)
        self._spawn(f"slurmd-{node}", [
            _which("nsenter"), f"--net=/var/run/netns/{node}",
            _which("unshare"), "--uts",
            "sh", "-c", 'hostname "$0" && exec "$1" -D -N "$0" -f "$2"',
            node, _which("slurmd"), str(self.conf),
        ], env=self.env)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while starting\n"
                                       + self._start_logs())
            result = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False)
            last = result.stdout.strip() or result.stderr.strip()
            states = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
            if result.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the nodes are not idle after {timeout:.0f} s: {last}\n" + self._start_logs())

    def _start_logs(self) -> str:
        parts = []
        for out in sorted((self.workdir / "log").glob("*.out")):
            parts.append(f"--- {out.name}\n{out.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts) + "\n" + self.diagnostics()

    def _wait_path(self, path: Path, timeout: float, name: str) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode})\n" + self._start_logs())
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: {path} did not appear\n" + self._start_logs())
            time.sleep(0.1)

    def _cancel_jobs(self) -> None:
        ctld = self._procs.get("slurmctld")
        if ctld is None or ctld.poll() is not None:
            return
        self.run("scancel", "--full", "--user=root", check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = self.run("squeue", "--noheader", "--format=%i", check=False)
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)

    def _namespace_pids(self) -> list[int]:
        """PIDs of the processes in this cluster's network namespaces (slurmd and job steps)."""
        inodes = set()
        for node in self._netns:
            with contextlib.suppress(OSError):
                inodes.add(os.stat(f"/var/run/netns/{node}").st_ino)
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(entry / "ns" / "net").st_ino in inodes:
                        pids.append(int(entry.name))
        return pids

    def _kill_namespace_processes(self) -> None:
        # job steps (slurmstepd and its tasks) left behind: they run in the namespaces
        slurmd_pids = {p.pid for name, p in self._procs.items() if name.startswith("slurmd-")}
        pids = [pid for pid in self._namespace_pids() if pid not in slurmd_pids]
        _kill_pids(pids)

    def _stop_daemons(self) -> None:
        order = [n for n in self._procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            proc = self._procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        for proc in self._procs.values():
            _terminate(proc)
        self._procs.clear()


def _terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _kill_pids(pids: list[int], timeout: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w/:]*)=")


def parse_scontrol(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value two`` (one ``scontrol --oneliner`` record) as a dict."""
    matches = list(_FIELD.finditer(line))
    record = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(line)
        record[m.group(1)] = line[m.end():end].strip()
    return record
