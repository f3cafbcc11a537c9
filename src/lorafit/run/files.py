"""Files that are either whole or absent: fsync, write-to-a-temporary-then-rename, sha256.

Every file lorafit writes for keeps (status.json, `latest`, manifests, the data cache's meta, merged exports) goes
through `write_atomic` or the same steps, so a kill at any moment leaves the old file or the new one, never half.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync(path.parent, directory=True)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()
