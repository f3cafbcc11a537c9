"""A throw-away one-node Slurm on this machine, for the `slurm` test tier.

    python tests/slurm_cluster.py          # start one, print its SLURM_CONF, stop it on Enter (manual poking)

Debian's `slurm-wlm` and `munge` run as root without systemd: a private `munged` (started as the `munge` user on its
own socket), a generated slurm.conf (SlurmUser=root, proctrack/linuxproc, task/none, select/cons_tres, one node named
after this host with its CPUs and memory, private ports, spool and state folders), then `slurmctld` and `slurmd` in
the foreground as our children. Nothing under /etc is written and no system daemon is touched, so a cluster this
machine may already run is left alone; `stop()` ends only the processes `start()` started.

Client commands find the cluster through `SLURM_CONF` (see `env()`); jobs inherit it, so `srun` and
`scontrol requeue` inside a batch script reach the same controller.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel"]
MUNGE_KEY = Path("/etc/munge/munge.key")


class ClusterUnavailable(RuntimeError):
    """This machine cannot run a private Slurm (not root, or the packages cannot be installed)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge when any of their programs is missing (needs root and the registry)."""
    if all(shutil.which(p) for p in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("slurm-wlm/munge are not installed and this is not a root Debian machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(
        ["bash", "-c", "apt-get update -q && apt-get install -y -q " + " ".join(PACKAGES)],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 or not all(shutil.which(p) for p in DAEMONS):
        raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr[-2000:]}")


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            # Below the real total: slurmd drains a node whose RealMemory exceeds what it measures.
            return int(int(line.split()[1]) / 1024 * 0.9)
    return 1024


class SlurmCluster:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="lorafit-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    # -- configuration ------------------------------------------------------------------------------------------

    def env(self, base: dict | None = None) -> dict:
        e = dict(os.environ if base is None else base)
        e["SLURM_CONF"] = str(self.conf)
        return e

    def _write_conf(self) -> None:
        d = self.root
        cpus = os.cpu_count() or 1
        lines = [
            "ClusterName=lorafit-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A requeued job may start again only after the credential lifetime (default 120 s) plus one second.
            f"AuthInfo=socket={d / 'munge' / 'munge.socket'},cred_expire=10",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # Look at pending jobs every 2 s rather than every 60 s, so a requeued job starts once it is eligible.
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "JobRequeue=1",
            # Finished jobs stay queryable (scontrol show job) long enough for a test to read their exit code.
            "MinJobAge=600",
            "KillWait=10",
            "InactiveLimit=0",
            "MessageTimeout=20",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        if os.geteuid() != 0:
            raise ClusterUnavailable("starting a private Slurm needs root (SlurmUser=root, munged as munge)")
        ensure_installed()
        if not MUNGE_KEY.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        # munged refuses a socket folder others can write to, and runs as `munge`: give it its own folder, and let
        # it traverse ours.
        self.root.chmod(0o755)
        m = self.root / "munge"
        m.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(m, "munge", "munge")
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        self._write_conf()
        self._spawn(
            "munged",
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "munged",
                "--foreground",
                f"--socket={m / 'munge.socket'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
                f"--key-file={MUNGE_KEY}",
            ],
        )
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping").returncode == 0, timeout, "slurmctld did not answer ping")
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() in {"idle", "mixed", "allocated"}, timeout, "the node never became idle")
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.root / f"{name}.out").open("w")
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}: {self.logs()}")
            if ok():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f}s: {self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")) + [self.root / "munge/munged.log"]:
            if f.exists():
                out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job, then end the daemons this object started (slurmd last to leave no orphaned steps)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user=root", "--full", timeout=20)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", "-t", "R,CG").stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- queries ------------------------------------------------------------------------------------------------

    def run(self, *cmd: str, timeout: float = 30, check: bool = False, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd),
            env=self.env(kw.pop("env", None)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **kw,
        )

    def node_state(self) -> str:
        r = self.run("sinfo", "-h", "-N", "-o", "%T")
        return r.stdout.strip().rstrip("*~#!%$@^-").lower() if r.returncode == 0 else ""

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
        r = self.run("scontrol", "show", "job", "-o", job_id)
        if r.returncode != 0:
            return {}
        return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


if __name__ == "__main__":
    c = SlurmCluster().start()
    print(f"export SLURM_CONF={c.conf}")
    try:
        input("cluster up; press Enter to stop it\n")
    finally:
        c.stop()
