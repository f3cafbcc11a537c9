"""Checkpoints that survive anything: atomic commits with a manifest, verified resume, signal-safe stops, the
non-finite step policy and the lock on the run folder.

A run folder (output.dir):

    RUN/.lock                          held by rank 0 of the run writing here (pid, host, SLURM job id)
    RUN/status.json                    running | stopped_to_resume | stopped_nonfinite | finished, with step and exit code
    RUN/checkpoints/checkpoint-N/      committed: manifest.json lists every file with its size and sha256
    RUN/checkpoints/latest             the name of the newest committed checkpoint; moves only after a commit
    RUN/checkpoints/.staging/          saves in progress; whatever is left there is removed at the next start

What goes into a checkpoint is HF Trainer's: adapter (safetensors), optimizer, scheduler, per-rank RNG, trainer
state (whose global_step fixes the data position: HF skips the consumed batches on resume), DeepSpeed's own shards
under ZeRO; plus our lorafit_state.json (skip counters, world size, model and LoRA fingerprint). Loading it back is
HF's too (`train(resume_from_checkpoint=...)`). Where HF falls short, and what this module adds:
- `_save_checkpoint` writes checkpoint-N in place: a kill mid-save leaves a folder that looks like a checkpoint. Here
  HF writes into a staging folder, and `commit` (below) makes it appear under its name only when complete.
- There is no manifest and `resume_from_checkpoint` verifies nothing: a truncated optimizer.pt fails deep inside
  torch.load, a flipped bit loads silently, an adapter of another shape fails with a long traceback. Here every file
  is hashed on commit and checked before loading; a mismatch is refused with one line.
- `save_total_limit` rotation and `get_last_checkpoint` go by folder names and mtimes, not by what was committed.

Commit protocol (`commit`, called by every rank):
 1. each rank fsyncs the files under the staging folder after its own writes are done, so every file is synced by
    the process (and node) that wrote it;
 2. barrier (collective);
 3. rank 0 hashes every file, writes manifest.json (tmp, fsync, rename), renames the staging folder to
    checkpoint-N and fsyncs the parent; only then `latest` moves and checkpoints beyond keep_last are retired
    (renamed to .trash-* first, so a half-deleted checkpoint is never visible under its name);
 4. barrier (collective): no rank goes on, or exits with 75, before the commit is durable.
A folder without a manifest (an interrupted save) is never loaded.

Exit codes: 0 finished (or the folder held a finished run), 2 a user's mistake (a corrupted or incompatible
checkpoint, a locked run folder), 75 = EXIT_STOPPED_TO_RESUME (a signal: checkpoint saved, resume with
`--resume auto`), 3 = EXIT_NONFINITE (too many consecutive non-finite steps; the last good checkpoint is intact).
`accelerate launch` turns any non-zero exit of its child into 1, so wrappers read RUN/status.json instead.

Test hooks (environment variables, read only by the code paths named): LORAFIT_TEST_KILL_AT=I SIGKILLs rank
LORAFIT_TEST_KILL_RANK (default 0) at the I-th event of a save (truncating the file it was about to sync, as if
killed mid-write), optionally only during the save of step LORAFIT_TEST_KILL_STEP; LORAFIT_TEST_SIGNAL_AT=RANK:STEP
sends SIGUSR1 to that rank at the start of that optimizer step; LORAFIT_TEST_NAN_AT=RANK:STEP (or RANK:FIRST-LAST)
makes that rank's loss NaN at those steps.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lorafit.errors import EXIT_STOPPED_TO_RESUME, UserError

log = logging.getLogger("lorafit")

CKPT_DIR = "checkpoints"
STAGING = ".staging"
PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
STATE = "lorafit_state.json"
LATEST = "latest"
STATUS = "status.json"
LOCK = ".lock"
FORMAT = 1
EXIT_NONFINITE = 3
_CKPT_RE = re.compile(rf"^{PREFIX}(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# Ranks and collectives. torch is looked up, not imported: without torch in the process there is no process group
# (the commit protocol then runs in a bare Python process, which the fast tests use).


def _dist():
    d = sys.modules.get("torch.distributed")
    return d if d is not None and d.is_available() and d.is_initialized() else None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()  # collective: every rank of the group must reach it


def broadcast_from_main(obj: Any) -> Any:
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)  # collective: rank 0's object to every rank (a host-device sync on NCCL)
    return box[0]


# ----------------------------------------------------------------------------------------------------------------
# Files


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


class _KillHook:
    """LORAFIT_TEST_KILL_AT (see the module docstring): a deterministic kill -9 at one point of a save."""

    def __init__(self):
        at = os.environ.get("LORAFIT_TEST_KILL_AT")
        self.at = int(at) if at else None
        self.step = int(os.environ.get("LORAFIT_TEST_KILL_STEP", "-1"))
        self.rank = int(os.environ.get("LORAFIT_TEST_KILL_RANK", "0"))
        self.n = 0

    def __call__(self, step: int, event: str, path: Path | None = None, truncate: bool = False) -> None:
        if self.at is None or rank() != self.rank or (self.step >= 0 and step != self.step):
            return
        if self.n == self.at:
            if truncate and path is not None and path.is_file():
                os.truncate(path, path.stat().st_size // 2)
            os.write(2, f"lorafit test hook: SIGKILL at save event {self.n} ({event} {path or ''})\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)
        self.n += 1


_kill_hook = _KillHook()


# ----------------------------------------------------------------------------------------------------------------
# Commit, discovery, verification


def checkpoints_dir(run: Path) -> Path:
    return Path(run) / CKPT_DIR


def step_of(folder: Path) -> int | None:
    m = _CKPT_RE.match(Path(folder).name)
    return int(m.group(1)) if m else None


def committed(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint of a run folder, oldest first. Only a manifest makes one."""
    root = checkpoints_dir(run)
    if not root.is_dir():
        return []
    out = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted((s, p) for s, p in out if (p / MANIFEST).is_file())


def _retire(folder: Path, step: int) -> None:
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)  # atomic: the checkpoint disappears under its name before any file is deleted
    _fsync(folder.parent, directory=True)
    _kill_hook(step, "retired", trash)
    files = _files(trash)
    if files:
        files[0].unlink()
        _kill_hook(step, "trash-partly-deleted", trash)
    shutil.rmtree(trash, ignore_errors=True)


def commit(staging: Path, step: int, keep_last: int, is_main: bool | None = None) -> Path:
    """Commit a staged checkpoint folder (every rank calls this after writing its files). Returns the final folder."""
    is_main = rank() == 0 if is_main is None else is_main
    staging = Path(staging)
    root = staging.parent.parent  # RUN/checkpoints; staging is RUN/checkpoints/.staging/checkpoint-N
    final = root / staging.name
    for f in _files(staging) if staging.is_dir() else []:
        _kill_hook(step, "file", f, truncate=True)
        with contextlib.suppress(FileNotFoundError):  # another rank's temporary file, renamed meanwhile
            _fsync(f)
    barrier()  # collective: every rank's files are written and synced
    if is_main:
        files = {
            str(p.relative_to(staging)): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in _files(staging)
            if p.name != MANIFEST
        }
        manifest = {"format": FORMAT, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        tmp = staging / (MANIFEST + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _kill_hook(step, "manifest-tmp", tmp)
        os.replace(tmp, staging / MANIFEST)
        _fsync(staging, directory=True)
        _kill_hook(step, "manifest", staging / MANIFEST)
        if final.exists():  # the same step saved again (a resume from an older checkpoint of this folder)
            _retire(final, step)
        os.replace(staging, final)  # the commit point
        _fsync(root, directory=True)
        with contextlib.suppress(OSError):
            staging.parent.rmdir()  # empty: saves are sequential
        _kill_hook(step, "committed", final)
        _write_atomic(root / LATEST, final.name + "\n")
        _kill_hook(step, "latest", root / LATEST)
        for _, old in committed(root.parent)[:-keep_last] if keep_last > 0 else []:
            if old != final:
                _retire(old, step)
    barrier()  # collective: nobody continues (or exits) before the commit is durable
    return final


def clean_abandoned(run: Path) -> list[str]:
    """Remove staging folders and half-deleted checkpoints left by a killed process (call under the run lock)."""
    root = checkpoints_dir(run)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name == STAGING or p.name.startswith(".trash-") or p.name.startswith(LATEST + ".tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{folder} is not a committed checkpoint (no {MANIFEST}; an interrupted save is never "
            "loaded); give a folder RUN/checkpoints/checkpoint-N, or --resume auto"
        )
    try:
        manifest = json.loads(path.read_text())
        manifest["files"].items()
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"checkpoint {folder} has an unreadable {MANIFEST}; resume from an older checkpoint with "
            "--resume PATH, or start a new output.dir"
        ) from None
    return manifest


def verify(folder: Path) -> dict:
    """Check every file of a committed checkpoint against its manifest; return the manifest or refuse (UserError)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    fix = "resume from an older checkpoint with --resume PATH, or start a new output.dir"
    for name, want in sorted(manifest["files"].items()):
        p = folder / name
        if not p.is_file():
            raise UserError(f"checkpoint {folder} is incomplete: {name}, listed in its manifest, is missing; {fix}")
        size = p.stat().st_size
        if size != want["size"]:
            raise UserError(
                f"checkpoint {folder} is corrupted: {name} has {size} bytes, its manifest says {want['size']}; {fix}"
            )
        if sha256(p) != want["sha256"]:
            raise UserError(
                f"checkpoint {folder} is corrupted: the sha256 of {name} does not match its manifest; {fix}"
            )
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Run status and the run-folder lock


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
    _write_atomic(Path(run) / STATUS, json.dumps(body, indent=2) + "\n")


def _proc_start(pid: int) -> str | None:
    """Start time of a process (Linux), so a recycled pid is not mistaken for the lock's owner."""
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
    now = _proc_start(pid)
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
            "start": _proc_start(os.getpid()),
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
                    raise UserError(
                        f"run folder {self.path.parent} is in use by another run (pid {owner.get('pid')} on host "
                        f"{owner.get('host')}, since {owner.get('since')}); wait for it to end or pick another "
                        f"output.dir (if that run is gone, delete {self.path})"
                    ) from None
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


# ----------------------------------------------------------------------------------------------------------------
# Signals


class StopSignals:
    """SIGTERM / SIGUSR1 only set a flag, read at the next step boundary; a second one stops at once (128+signum)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, on_hard_stop=None):
        self.received: int | None = None
        self._old: dict = {}
        self.was_blocked: list[str] = []
        self._on_hard_stop = on_hard_stop

    def install(self) -> None:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        # A blocked signal mask is inherited through fork and exec, and a handler does not unblock it: started under
        # a supervisor that blocks SIGTERM/SIGUSR1, the preemption notice would stay pending for ever and the run
        # would be killed without its checkpoint. Defensive: the launchers we test with (accelerate, torchrun,
        # srun, coreutils timeout) leave the mask empty.
        self.was_blocked = sorted(signal.Signals(s).name for s in signal.pthread_sigmask(signal.SIG_UNBLOCK,
                                                                                          self.SIGNALS)
                                  if s in self.SIGNALS)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            # os.write, not logging: a handler may interrupt a logging call that holds the handler's lock
            os.write(
                2,
                f"lorafit: {name} received: saving a checkpoint at the next step boundary, then exiting "
                f"with {EXIT_STOPPED_TO_RESUME} (send it again to stop at once)\n".encode(),
            )
            return
        os.write(2, f"lorafit: second {name}: stopping at once, without a checkpoint\n".encode())
        if self._on_hard_stop:
            self._on_hard_stop()
        os._exit(128 + signum)


def _test_hook_fires(var: str, step: int) -> bool:
    """A RANK:STEP or RANK:FIRST-LAST test hook (see the module docstring) that names this rank and step."""
    v = os.environ.get(var)
    if not v:
        return False
    r, _, steps = v.partition(":")
    first, _, last = steps.partition("-")
    return int(r) == rank() and int(first) <= step <= int(last or first)


# ----------------------------------------------------------------------------------------------------------------
# Compatibility of a checkpoint with the model being trained


def fingerprint(model) -> dict:
    """What must match for a checkpoint to load into `model`: base architecture and every trainable tensor's shape."""
    cfg = getattr(model, "config", None)
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    )
    arch = {k: getattr(cfg, k, None) for k in keys}
    # ds_shape: under ZeRO-3 a parameter's own shape is its (empty) local partition
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}
    return {"arch": arch, "trainable": shapes}


def compare(folder: Path, saved: dict, here: dict, saved_world: int | None, world: int) -> None:
    """Refuse (UserError) a checkpoint saved for another base, LoRA shape or number of processes."""
    fix = f"resume with the recipe it was saved with ({Path(folder).parent.parent}/recipe.yaml), or start a new output.dir"
    for k, v in saved.get("arch", {}).items():
        if here["arch"].get(k) != v:
            raise UserError(
                f"checkpoint {folder} was saved for a different base model: {k} is {v} there, "
                f"{here['arch'].get(k)} here; {fix}"
            )
    a, b = saved.get("trainable", {}), here["trainable"]
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[0]
        where = "only in the checkpoint" if only in a else "only in this model"
        raise UserError(
            f"checkpoint {folder} was saved for different LoRA targets ({len(a)} trainable tensors "
            f"there, {len(b)} here; {only} is {where}); {fix}"
        )
    for n in sorted(a):
        if list(a[n]) != list(b[n]):
            raise UserError(
                f"checkpoint {folder} was saved for a different LoRA shape: {n} is {a[n]} there, {b[n]} here; {fix}"
            )
    if saved_world is not None and saved_world != world:
        raise UserError(
            f"checkpoint {folder} was saved by {saved_world} processes, this run has {world}; resume "
            "with the same number of processes (optimizer shards, RNG streams and the data position "
            "are per process), or start a new output.dir"
        )


# ----------------------------------------------------------------------------------------------------------------
# The run session: lock, resume decision, per-step guard, saves and the end of a run


class RunSession:
    """Everything about one process's run in a run folder. Built after the training arguments (which start the
    process group) and before the model loads, so a locked folder or a corrupted checkpoint fails fast.

    resume: "auto" (newest committed checkpoint of the run folder, verified), "none", or a checkpoint folder (or a
    run folder, meaning its newest)."""

    def __init__(self, run_dir, cfg, layout, resume: str = "auto"):
        self.run_dir = run_dir  # lorafit.cli.RunDir
        self.path = Path(run_dir.path)
        self.cfg = cfg.checkpoint
        self.world = layout.world_size
        self.is_main = layout.is_main
        self.lock = RunLock(self.path)
        self.signals = StopSignals(on_hard_stop=self.lock.release)
        self.resume_path: str | None = None
        self.resume_step = 0
        self.saved_state: dict = {}
        self.finished = False
        self.stop_reason: str | None = None  # "signal" | "nonfinite"
        self.last_checkpoint: Path | None = None
        self.guard: StepGuard | None = None
        self.trainer = None
        self._last_save = time.monotonic()
        decision = self._decide(resume) if self.is_main else None
        decision = broadcast_from_main(decision)  # collective: every rank resumes from the same verified checkpoint
        if decision["error"]:
            self.close()
            raise UserError(decision["error"])
        self.finished = decision["finished"]
        if self.finished:
            log.info("%s", decision["message"])
            self.close()
            return
        if decision["path"]:
            self.resume_path, self.resume_step = decision["path"], decision["step"]
            self.saved_state = json.loads((Path(self.resume_path) / STATE).read_text())
            log.info(
                "resuming from %s (step %d, verified against its manifest in %.1f s)",
                self.resume_path,
                self.resume_step,
                decision.get("verify_s", 0.0),
            )
        self.signals.install()
        if self.signals.was_blocked:
            log.info("%s arrived blocked from the launching process; unblocked, so a stop signal still checkpoints",
                     "/".join(self.signals.was_blocked))
        atexit.register(self.close)

    @property
    def purge_step(self) -> int | None:
        """TensorBoard purge step: events of step N were written before checkpoint-N was saved, so a resume from
        step N purges from N+1 on (what the killed run logged after its checkpoint) and keeps step N."""
        return self.resume_step + 1 if self.resume_path else None

    def _decide(self, resume: str) -> dict:
        out = {"error": None, "finished": False, "path": None, "step": 0, "message": ""}
        try:
            self.run_dir.create()
            self.lock.acquire()
            gone = clean_abandoned(self.path)
            if gone:
                log.info("removed what interrupted saves left in %s: %s", checkpoints_dir(self.path), ", ".join(gone))
            status = read_status(self.path)
            have = committed(self.path)
            if resume == "none":
                if have:
                    raise UserError(
                        f"run folder {self.path} already holds checkpoints (newest {have[-1][1].name}); "
                        "continue it with --resume auto, or pick a new output.dir"
                    )
                return out
            if resume == "auto":
                if status.get("state") == "finished":
                    out["finished"] = True
                    out["message"] = (
                        f"run folder {self.path} holds a finished run ({status.get('step')} steps); "
                        "nothing to resume. To train further, --resume one of its checkpoints with a "
                        "larger training.max_steps; to start over, pick a new output.dir"
                    )
                    return out
                if not have:
                    log.info("no checkpoint in %s: starting from step 0", self.path)
                    return out
                folder = have[-1][1]
            else:
                folder = Path(resume).expanduser()
                if not (folder / MANIFEST).is_file() and committed(folder):
                    folder = committed(folder)[-1][1]  # a run folder: its newest checkpoint
                if not folder.is_dir():
                    raise UserError(
                        f"--resume {resume}: no such folder; give RUN/checkpoints/checkpoint-N, a run "
                        "folder, auto or none"
                    )
            t0 = time.perf_counter()
            manifest = verify(folder)
            out["verify_s"] = round(time.perf_counter() - t0, 2)
            if not (folder / STATE).is_file():
                raise UserError(f"checkpoint {folder} has no {STATE}; it was not written by lorafit")
            step = int(manifest["step"])
            if folder.parent == checkpoints_dir(self.path):
                for s, newer in committed(self.path):
                    if s > step:  # a later lineage: retire it so --resume auto never mixes the two
                        log.info("retiring %s (newer than the checkpoint resumed from)", newer.name)
                        _retire(newer, step)
            out.update(path=str(folder), step=step)
        except UserError as e:
            out["error"] = str(e)
        return out

    # --- attaching to the trainer ---------------------------------------------------------------------------

    def attach(self, trainer) -> None:
        """Hook into a LorafitTrainer (CheckpointingMixin); on a resume, refuse a checkpoint of another shape."""
        self.trainer = trainer
        trainer._lorafit = self
        self.guard = StepGuard(self, trainer)
        trainer.add_callback(self.guard)
        if self.resume_path:
            # eval_on_start is the base model's baseline at step 0, which the resumed run has already logged; at the
            # resume step it would put a second eval/loss on a step the stopped run may have evaluated too.
            trainer.args.eval_on_start = False
            compare(
                Path(self.resume_path),
                self.saved_state.get("model", {}),
                fingerprint(trainer.model),
                self.saved_state.get("world_size"),
                self.world,
            )
            if self.is_main:
                write_status(self.path, "running", step=self.resume_step, resumed_from=self.resume_path)
        elif self.is_main:
            write_status(self.path, "running", step=0)

    def time_due(self) -> bool:
        m = self.cfg.every_minutes
        return bool(m) and time.monotonic() - self._last_save >= 60.0 * m

    def save(self, trainer, model, trial, hf_save) -> None:
        """HF's checkpoint writer, pointed at a staging folder, then `commit` (every rank calls this)."""
        step = trainer.state.global_step
        staging_root = checkpoints_dir(self.path) / STAGING
        t0 = time.perf_counter()
        trainer._lorafit_output_dir = str(staging_root)
        try:
            hf_save(model, trial)  # writes staging_root/checkpoint-N (adapter, optimizer, scheduler, RNG, state)
        finally:
            trainer._lorafit_output_dir = None
        staging = staging_root / f"{PREFIX}{step}"
        if self.is_main:
            state = {
                "step": step,
                "world_size": self.world,
                "model": fingerprint(trainer.model),
                **self.guard.state(),
                "epoch": trainer.state.epoch,
                "data_position": {"epoch": trainer.state.epoch, "optimizer_steps": step},
            }
            (staging / STATE).write_text(json.dumps(state, indent=1))
        final = commit(staging, step, self.cfg.keep_last)
        self.last_checkpoint = final
        self._last_save = time.monotonic()
        size = sum(p.stat().st_size for p in _files(final)) if self.is_main else 0
        log.info("checkpoint %s committed in %.1f s (%.1f MB)", final, time.perf_counter() - t0, size / 2**20)

    # --- the end of a run -----------------------------------------------------------------------------------

    def stopped_exit_code(self) -> int | None:
        """After train(): None if training ran to its end; else the exit code (status.json written)."""
        if self.stop_reason is None:
            return None
        step = self.trainer.state.global_step if self.trainer else 0
        ckpt = str(self.last_checkpoint) if self.last_checkpoint else None
        if self.stop_reason == "signal":
            code = EXIT_STOPPED_TO_RESUME
            log.info(
                "stopped at step %d on a signal; checkpoint %s; resume with --resume auto (exit %d)", step, ckpt, code
            )
            state = "stopped_to_resume"
        else:
            code = EXIT_NONFINITE
            good = committed(self.path)
            last = str(good[-1][1]) if good else None
            log_main = log.warning if self.is_main else log.debug
            log_main(
                "stopped at step %d after %d consecutive steps with a non-finite loss or gradient; the last "
                "good checkpoint is %s (intact); lower training.learning_rate or check the data, then "
                "--resume auto",
                step,
                self.guard.consecutive,
                last,
            )
            state, ckpt = "stopped_nonfinite", last
        if self.is_main:
            write_status(self.path, state, step=step, checkpoint=ckpt, exit_code=code, **self.guard.state())
        barrier()  # collective: torchrun SIGTERMs the other ranks once one exits; status.json is written by then
        # The handlers stay installed: that SIGTERM then only sets the flag, and every rank exits with `code`.
        self.close(restore_signals=False)
        return code

    def summary_extra(self, trainer) -> dict:
        """Skip counts and per-rank optimizer step counts for summary.json (every rank calls it: a collective)."""
        import torch

        n = torch.tensor([_optimizer_steps(trainer)], dtype=torch.int64, device=trainer.args.device)
        per_rank = trainer.accelerator.gather(n).tolist()  # collective; host-device sync
        return {
            "skipped_steps": self.guard.skipped,
            "nonfinite_steps": self.guard.nonfinite,
            "optimizer_steps_per_rank": per_rank,
            "resumed_from": self.resume_path,
            "resumed_at_step": self.resume_step if self.resume_path else None,
        }

    def finish(self, summary: dict) -> None:
        if self.is_main:
            write_status(
                self.path,
                "finished",
                step=summary.get("steps"),
                exit_code=0,
                checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            )
        self.close()

    def close(self, restore_signals: bool = True) -> None:
        if restore_signals:
            self.signals.restore()
        self.lock.release()


def _optimizer_steps(trainer) -> int:
    """Optimizer steps applied, read from the optimizer's own state (torch and bitsandbytes Adam keep 'step');
    -1 where the optimizer keeps none (DeepSpeed's)."""
    if trainer.is_deepspeed_enabled:
        return -1
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for st in opt.state.values():
        if isinstance(st, dict) and "step" in st:
            return int(st["step"])
    return 0


class StepGuard(TrainerCallback):
    """At every optimizer step boundary, one collective decides for all ranks together: skip this step (a non-finite
    loss or gradient on any rank), stop (a signal on any rank), save (time due on rank 0's clock)."""

    def __init__(self, session: RunSession, trainer):
        self.s = session
        self.t = trainer
        st = session.saved_state
        self.skipped = int(st.get("skipped_steps", 0))
        self.nonfinite = int(st.get("nonfinite_steps", 0))
        self.consecutive = int(st.get("consecutive_nonfinite", 0))
        self.bad_local = None  # device tensor: a non-finite loss in this step's micro-batches on this rank
        self.grad_norm = None
        self.step_bad = self.step_skipped = self.stop = self.due = self.poisoned = False

    def state(self) -> dict:
        return {
            "skipped_steps": self.skipped,
            "nonfinite_steps": self.nonfinite,
            "consecutive_nonfinite": self.consecutive,
        }

    def note_loss(self, loss) -> None:
        import torch

        bad = (~torch.isfinite(loss.detach())).any()  # stays on the device: no sync per micro-batch
        self.bad_local = bad if self.bad_local is None else self.bad_local | bad

    def on_step_begin(self, args, state, control, **kw):
        if _test_hook_fires("LORAFIT_TEST_SIGNAL_AT", state.global_step + 1):
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        import torch

        dev = args.device
        bad = torch.zeros((), dtype=torch.bool, device=dev) if self.bad_local is None else self.bad_local.to(dev)
        gn = self.grad_norm
        if getattr(self.t.accelerator, "scaler", None) is not None:
            # fp16 AMP: inf gradients with a finite loss are the GradScaler's business (it skips the step and lowers
            # the scale; several in a row are normal while it calibrates); only a non-finite loss counts here.
            gn = None
        if isinstance(gn, torch.Tensor):
            bad = bad | ~torch.isfinite(gn.detach().to(dev)).all()
        elif gn is not None and not math.isfinite(gn):
            bad = torch.ones((), dtype=torch.bool, device=dev)
        host = torch.tensor([float(self.s.signals.received is not None), float(self.s.is_main and self.s.time_due())])
        flags = torch.cat([bad.float().reshape(1), host.to(dev)])  # [non-finite, stop, save due]
        d = _dist()
        if d is not None and d.get_world_size() > 1:
            d.all_reduce(flags, op=d.ReduceOp.MAX)  # collective, once per optimizer step: the same decision everywhere
        nonfinite, stop, due = (v > 0 for v in flags.tolist())  # host-device sync, once per optimizer step
        self.bad_local = self.grad_norm = None
        self.step_bad, self.stop, self.due = nonfinite, self.stop or stop, due
        self.step_skipped = False
        if nonfinite:
            if self.t.is_deepspeed_enabled:
                # DeepSpeed stepped inside backward(); it skips only when its own overflow check fired (fp16, ZeRO-2).
                self.step_skipped = bool(self.t.accelerator.optimizer_step_was_skipped)
                self.poisoned = self.poisoned or not self.step_skipped
            else:
                # torch and bitsandbytes optimizers leave a parameter without .grad untouched (no moment update, no
                # weight decay, no step count): with every grad cleared, optimizer.step() is a no-op on every rank.
                for group in self.t.optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
                self.step_skipped = True

    def on_step_end(self, args, state, control, **kw):
        cfg = self.s.cfg
        if self.step_bad:
            self.nonfinite += 1
            self.skipped += int(self.step_skipped)
            self.consecutive += 1
            (log.warning if self.s.is_main else log.debug)(
                "step %d: non-finite loss or gradient on some rank; %s (%d in a row)",
                state.global_step,
                "optimizer step skipped on every rank"
                if self.step_skipped
                else "DeepSpeed applied it: no checkpoint will be saved from here on",
                self.consecutive,
            )
            if self.consecutive >= cfg.max_consecutive_skips:
                self.s.stop_reason = "nonfinite"
                control.should_training_stop = True
                control.should_save = False
                return control
        else:
            self.consecutive = 0
        if self.stop:
            self.s.stop_reason = "signal"
            control.should_training_stop = True
        periodic = cfg.every_steps > 0 and state.global_step % cfg.every_steps == 0
        final = state.global_step >= state.max_steps and (cfg.every_steps > 0 or cfg.every_minutes > 0)
        if (self.stop or periodic or self.due or final) and not self.poisoned:
            control.should_save = True
        return control


def _nan_loss(out):
    return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")


class CheckpointingMixin:
    """Mixed into lorafit's SFTTrainer: routes HF's checkpoint writer through `RunSession.save` and feeds the
    per-step guard. Inert until `RunSession.attach(trainer)`."""

    _lorafit: RunSession | None = None
    _lorafit_output_dir: str | None = None

    def training_step(self, model, inputs, *a, **kw):
        if self._lorafit is not None and _test_hook_fires("LORAFIT_TEST_NAN_AT", self.state.global_step + 1):
            # Whatever computes the loss (TRL's or a subclass's lean path), its result becomes NaN before backward.
            inner = self.compute_loss
            self.compute_loss = lambda *x, **y: _nan_loss(inner(*x, **y))
            try:
                loss = super().training_step(model, inputs, *a, **kw)
            finally:
                del self.compute_loss
        else:
            loss = super().training_step(model, inputs, *a, **kw)
        if self._lorafit is not None:
            self._lorafit.guard.note_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        gn = super()._get_grad_norm(model, grad_norm)
        if self._lorafit is not None:
            self._lorafit.guard.grad_norm = gn
        return gn

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # TRL keeps a quantized model's LoRA weights in bf16, but HF reloads them with PEFT's load_adapter, whose
        # autocast_adapter_dtype upcasts them to fp32: the resumed run would train at another precision than the
        # run it continues. Put every trainable tensor back into the dtype it had (bf16 -> fp32 -> bf16 is exact).
        target = self.model if model is None else model
        before = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for n, p in target.named_parameters():
            if n in before and p.dtype != before[n]:
                p.data = p.data.to(before[n])

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.optimizer is not None:
            repage_optimizer_state(self.optimizer)

    def _maybe_log_save_evaluate(self, tr_loss, *a, **kw):
        super()._maybe_log_save_evaluate(tr_loss, *a, **kw)
        if self._lorafit is not None and self._globalstep_last_logged == self.state.global_step:
            # HF "resets" the accumulated loss with tr_loss -= tr_loss, which keeps a NaN for ever once its own
            # per-micro-step NaN filter is off (it is: a sync per micro-step, see build_args). Zeroing it after each
            # log (no sync) confines a skipped step's NaN to the log interval it happened in.
            tr_loss.zero_()

    def _get_output_dir(self, trial):
        return self._lorafit_output_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        if self._lorafit is None:
            return super()._save_checkpoint(model, trial)
        self._lorafit.save(self, model, trial, super()._save_checkpoint)

    def log(self, logs, *a, **kw):
        if self._lorafit is not None and "loss" in logs:
            logs["skipped_steps"] = self._lorafit.guard.skipped
        return super().log(logs, *a, **kw)


def repage_optimizer_state(optimizer) -> int:
    """Give a restored bitsandbytes paged optimizer real paged state again; returns how many tensors were re-paged.

    Why this exists: a paged optimizer's state lives in CUDA managed memory and carries the Python attributes
    `is_paged` and `page_deviceid`. torch.save pickles those attributes and torch.load restores them on whatever
    tensor it builds: HF loads optimizer.pt onto each rank's GPU under DDP (onto the CPU with one process), so the
    restored state is ordinary memory still flagged as paged, with the device id of the rank that saved it. The next
    step asks CUDA to prefetch it to that device, and on rank 1 of 2 H100s bitsandbytes stopped with "Error invalid
    argument at line 578 in file /src/csrc/pythonInterface.cpp" (bitsandbytes issues #782 and #1708; not fixed in
    0.50.2). Here each such tensor is copied into a fresh paged buffer on its parameter's device, exactly what the
    optimizer would have allocated itself; where paging is unavailable (CPU parameters: bitsandbytes falls back to
    unpaged there) the stale flag is dropped instead."""
    import torch

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    if not getattr(opt, "is_paged", False):
        return 0
    repaged = 0
    for param, state in opt.state.items():
        if not isinstance(param, torch.Tensor):
            continue
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor) or not getattr(value, "is_paged", False):
                continue
            if param.device.type == "cuda":
                from bitsandbytes import functional as bnbF

                buf = bnbF.get_paged(*value.shape, dtype=value.dtype, device=param.device)
                buf.copy_(value)  # host-device copy, once per state tensor at resume
                opt.page_mng.paged_tensors.append(buf)
                state[key] = buf
                repaged += 1
            else:
                del value.is_paged
                value.__dict__.pop("page_deviceid", None)
    return repaged
