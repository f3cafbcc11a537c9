"""output.dir's checks, made before anything is read, loaded or written (the first step of lorafit.run.session).

A run folder is a folder of its own. Refused, each with one line saying what to do:
- the current folder, or a folder that holds it (an empty `--set output.dir=` from an unset shell variable once
  trained into the current folder and overwrote the README there);
- the model's, the tokenizer's or the data's folder, or a folder inside one (the run's tokenizer files would replace
  the model's; the data reader would take the run's .json files for data on the next run);
- an existing folder that is not a lorafit run folder and holds files a run writes (README.md, tokenizer files, ...);
- a file; a folder where nothing can be written (a read-only mount, no permission);
- a file system without room for a checkpoint and the final adapter, as the memory planner estimates them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lorafit.errors import UserError
from lorafit.hub import looks_local

# What a run writes at the top of its folder (adapter and tokenizer files come from peft's and transformers' savers)
WRITES = frozenset({"adapter_model.safetensors", "adapter_config.json", "README.md", "recipe.yaml", "summary.json",
                    "status.json", "log.txt", "tb", "checkpoints", "merged", "tokenizer.json", "tokenizer_config.json",
                    "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", ".lock"})


def is_run_folder(path: Path) -> bool:
    return (path / "status.json").is_file() or (path / "recipe.yaml").is_file() or (path / "checkpoints").is_dir()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _sources(cfg) -> list[tuple[str, Path]]:
    """(recipe key, local folder) of each source the run reads from a local folder."""
    from lorafit.source import resolve_source

    out = []
    try:
        model = Path(resolve_source(cfg.model))
        if model.is_dir():
            out.append(("model.name", model))
    except UserError:
        pass  # a missing model folder is reported when the model is looked for, with its own message
    for key, name in (("model.tokenizer", cfg.model.tokenizer), ("data.path", cfg.data.path)):
        if name and not name.startswith("synthetic:") and looks_local(name) and Path(name).expanduser().is_dir():
            out.append((key, Path(name).expanduser()))
    return out


def _writable_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(cfg, layout=None) -> Path:
    raw = cfg.output.dir
    out = Path(raw).expanduser().resolve()
    fix = f"give the run a folder of its own, e.g. --set output.dir=runs/{cfg.name}"
    cwd = Path.cwd().resolve()
    if _inside(cwd, out):
        what = "the current folder" if out == cwd else f"a folder that holds the current folder ({cwd})"
        raise UserError(f"output.dir={raw} is {what}; a run writes its adapter, tokenizer and README.md there; {fix}")
    for key, folder in _sources(cfg):
        if _inside(out, folder.resolve()):
            raise UserError(f"output.dir={raw} is inside {key}'s folder {folder}; the run would write its files "
                            f"among those it reads (its tokenizer files over the model's); {fix}")
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir={raw} is a file, not a folder; {fix}")
    if out.is_dir() and not is_run_folder(out):
        clash = sorted(WRITES & set(os.listdir(out)))
        if clash:
            raise UserError(f"output.dir={raw} is not a lorafit run folder and holds {', '.join(clash[:3])}, which "
                            f"a run would overwrite; {fix}")
    base = _writable_ancestor(out)
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".lorafit-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"output.dir={raw}: cannot write in {base} ({e.strerror}); give output.dir on a writable "
                        "file system") from None
    need = _bytes_needed(cfg, layout)
    if need is not None:
        free = shutil.disk_usage(base).free
        if free < need:
            raise UserError(f"output.dir={raw}: {free / 2**20:,.0f} MiB free on its file system, but a checkpoint "
                            f"and the final adapter need about {need / 2**20:,.0f} MiB (python src/train.py --plan); "
                            "free space there, or pick another output.dir")
    return out


def _bytes_needed(cfg, layout) -> int | None:
    """Room for one checkpoint and the final adapter (lorafit.plan); None where the model's shape is unknown."""
    from lorafit import plan

    try:
        shape = plan.shape_of(cfg.model)
    except UserError:
        return None  # the model is looked for later, with its own message
    return 2 * plan.checkpoint_bytes(cfg, shape, world=layout.world_size if layout else 1)
