"""Checkpoints that are whole or absent: the commit protocol, the manifest, discovery and verification.

A run folder's checkpoints (output.dir/checkpoints):

    checkpoint-N/        committed: manifest.json lists every file with its size and sha256
    latest               the name of the newest committed checkpoint; moves only after a commit
    .staging/            saves in progress; whatever is left there is removed at the next start
    .retired-checkpoint-N/   a newer lineage a resume set aside; deleted by the next commit

What goes into a checkpoint is HF Trainer's (adapter, optimizer, scheduler, per-rank RNG, trainer state whose
global_step fixes the data position, DeepSpeed's shards under ZeRO) plus lorafit_state.json (lorafit.run.session).
Where HF falls short, and what this module adds:
- `_save_checkpoint` writes checkpoint-N in place: a kill mid-save leaves a folder that looks like a checkpoint. Here
  HF writes into a staging folder, and `commit` makes it appear under its name only when complete.
- There is no manifest and `resume_from_checkpoint` verifies nothing: a truncated optimizer.pt fails deep inside
  torch.load, a flipped bit loads silently. Here every file is hashed on commit and checked before loading.
- `save_total_limit` rotation and `get_last_checkpoint` go by folder names and mtimes, not by what was committed.

Commit protocol (`commit`, called by every rank):
 1. each rank fsyncs the files under the staging folder after its own writes are done, so every file is synced by
    the process (and node) that wrote it;
 2. barrier (collective);
 3. rank 0 hashes every file, writes manifest.json (tmp, fsync, rename), renames the staging folder to
    checkpoint-N and fsyncs the parent; only then `latest` moves and checkpoints beyond keep_last are retired
    (renamed to .trash-* first, so a half-deleted checkpoint is never visible under its name);
 4. barrier (collective): no rank goes on, or exits, before the commit is durable.
A folder without a manifest (an interrupted save) is never loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from lorafit import dist
from lorafit.errors import UserError
from lorafit.run.files import files_under, fsync, sha256, write_atomic

CKPT_DIR = "checkpoints"
STAGING = ".staging"
RETIRED = ".retired-"
PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
STATE = "lorafit_state.json"
LATEST = "latest"
FORMAT = 1
_CKPT_RE = re.compile(rf"^{PREFIX}(\d+)$")


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


def uncommitted(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder without a manifest: never committed by lorafit (an interrupted
    save stays in .staging), so something else put it there or damaged it. Never loaded, never skipped silently."""
    root = checkpoints_dir(run)
    if not root.is_dir():
        return []
    out = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted((s, p) for s, p in out if not (p / MANIFEST).is_file())


def _no_event(step: int, event: str, path: Path | None = None, truncate: bool = False) -> None:
    """Where a test's fault hook (lorafit.run.faults) may act during a save; nothing happens in a normal run."""


def _retire(folder: Path, step: int, on_event=_no_event) -> None:
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)  # atomic: the checkpoint disappears under its name before any file is deleted
    fsync(folder.parent, directory=True)
    on_event(step, "retired", trash)
    files = files_under(trash)
    if files:
        files[0].unlink()
        on_event(step, "trash-partly-deleted", trash)
    shutil.rmtree(trash, ignore_errors=True)


def set_aside(folder: Path) -> Path:
    """Move a committed checkpoint out of sight (`.retired-checkpoint-N`) without deleting it: a resume from an older
    checkpoint retires the newer lineage this way, and the next commit deletes it (a run that fails before then
    leaves it for a person to restore)."""
    aside = folder.with_name(f"{RETIRED}{folder.name}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(folder, aside)  # atomic: never visible under its name half-moved
    fsync(folder.parent, directory=True)
    return aside


def commit(staging: Path, step: int, keep_last: int, is_main: bool | None = None, on_event=_no_event) -> Path:
    """Commit a staged checkpoint folder (every rank calls this after writing its files). Returns the final folder."""
    is_main = dist.is_main() if is_main is None else is_main
    staging = Path(staging)
    root = staging.parent.parent  # RUN/checkpoints; staging is RUN/checkpoints/.staging/checkpoint-N
    final = root / staging.name
    for f in files_under(staging) if staging.is_dir() else []:
        on_event(step, "file", f, truncate=True)
        with contextlib.suppress(FileNotFoundError):  # another rank's temporary file, renamed meanwhile
            fsync(f)
    dist.barrier()  # collective: every rank's files are written and synced
    if is_main:
        files = {
            str(p.relative_to(staging)): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in files_under(staging)
            if p.name != MANIFEST
        }
        manifest = {"format": FORMAT, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        tmp = staging / (MANIFEST + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        on_event(step, "manifest-tmp", tmp)
        os.replace(tmp, staging / MANIFEST)
        fsync(staging, directory=True)
        on_event(step, "manifest", staging / MANIFEST)
        if final.exists():  # the same step saved again (a resume from an older checkpoint of this folder)
            _retire(final, step, on_event)
        os.replace(staging, final)  # the commit point
        fsync(root, directory=True)
        with contextlib.suppress(OSError):
            staging.parent.rmdir()  # empty: saves are sequential
        on_event(step, "committed", final)
        write_atomic(root / LATEST, final.name + "\n")
        on_event(step, "latest", root / LATEST)
        for _, old in committed(root.parent)[:-keep_last] if keep_last > 0 else []:
            if old != final:
                _retire(old, step, on_event)
        for aside in root.glob(RETIRED + "*"):  # a newer lineage set aside by a resume: this commit replaces it
            shutil.rmtree(aside, ignore_errors=True)
    dist.barrier()  # collective: nobody continues (or exits) before the commit is durable
    return final


def clean_abandoned(run: Path) -> list[str]:
    """Remove staging folders and half-deleted checkpoints left by a killed process (call under the run lock). What a
    resume set aside (`.retired-*`) stays until the next commit."""
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
