"""The run folder's status file and its lock.

    RUN/status.json   running | stopped_to_resume | stopped_nonfinite | failed | finished, with step and exit code;
                      every way a run ends writes one of the last four (lorafit.run.session)
    RUN/.lock         held by rank 0 of the run writing here (pid, host, start time, SLURM job id)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from lorafit.errors import UserError
from lorafit.run.files import write_atomic

log = logging.getLogger("lorafit")

STATUS = "status.json"
LOCK = ".lock"


def read_status(run: Path) -> dict:
    try:
        return json.loads((Path(run) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def write_status(run: Path, state: str, **fields) -> None:
    body = {
        "state": state,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **fields,
    }
    write_atomic(Path(run) / STATUS, json.dumps(body, indent=2) + "\n")


def start_ticks(pid: int) -> str | None:
    """When a process started, in clock ticks after boot (Linux /proc/PID/stat, field 22); None where unknown. Tells
    a recycled pid from the lock's owner, and gives the CLI's stopwatch its zero."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = start_ticks(pid)
    return start is None or now is None or now == start


class RunLock:
    """An exclusive lock on a run folder: a file created with O_EXCL holding the owner's pid, host and SLURM job.

    Not flock: it is not reliable on the network filesystems run folders live on (NFS, Lustre without -o flock).
    A lock is stale, and taken over, when its owner is a dead process on this host, or an earlier incarnation of
    this same SLURM job (a requeued job keeps its id and runs again only after the old one has ended, on any node).
    """

    def __init__(self, run: Path):
        self.path = Path(run) / LOCK
        self.held = False

    def _mine(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": start_ticks(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _stale(self, owner: dict) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if job and owner.get("slurm_job_id") == job:
            return True
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            return not _alive(owner["pid"], owner.get("start"))
        return False

    def _owner(self) -> dict | None:
        """The lock's owner; {} for a lock left unreadable by a kill mid-write; None while it is being written."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"gone": True}
        except (OSError, ValueError):
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
            return {} if age > 30 else None

    def refuse_if_held(self) -> None:
        """Read-only: refuse now (UserError) if a live run holds the lock, before any work is done."""
        owner = self._owner() if self.path.exists() else None
        if owner and not owner.get("gone") and not self._stale(owner):
            raise self._in_use(owner)

    def _in_use(self, owner: dict) -> UserError:
        return UserError(
            f"run folder {self.path.parent} is in use by another run (pid {owner.get('pid')} on host "
            f"{owner.get('host')}, since {owner.get('since')}); wait for it to end or pick another "
            f"output.dir (if that run is gone, delete {self.path})"
        )

    def acquire(self) -> None:
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or owner.get("gone"):
                    time.sleep(0.1)
                    continue
                if owner and not self._stale(owner):
                    raise self._in_use(owner) from None
                log.info("taking over a stale lock on %s (%s)", self.path.parent, owner or "unreadable")
                stale = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):  # only one contender wins this rename; others retry
                    os.replace(self.path, stale)
                    stale.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self._mine(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.held = True
            return
        raise UserError(f"could not lock run folder {self.path.parent}: its lock keeps changing hands; retry")

    def release(self) -> None:
        if not self.held:
            return
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False
