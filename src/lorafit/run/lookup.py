"""A run's pieces for src/generate.py and src/merge.py: its recipe, its adapter (a checkpoint's verified against its
manifest first, as a resume would), and the tokenizer it trained with.

    find_recipe(folder)     recipe.yaml of a run folder, of a checkpoint's run, or of a merged export's run
    find_adapter(folder)    the folder's final adapter, else its newest committed checkpoint's (verified)
    run_tokenizer(...)      the tokenizer saved with the adapter or the run, else the recipe's
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorafit.run import commit as ck

log = logging.getLogger("lorafit")


def find_recipe(folder: Path) -> Path | None:
    for d in (folder, folder.parent, folder.parent.parent):  # run/, run/merged, run/checkpoints/checkpoint-N
        if (d / "recipe.yaml").is_file():
            return d / "recipe.yaml"
    return None


def find_adapter(folder: Path) -> Path | None:
    """A checkpoint folder (verified), a folder with a final adapter, or a run folder's newest committed checkpoint
    with an adapter (verified); None when there is none. A corrupted checkpoint is refused (UserError)."""
    if (folder / ck.MANIFEST).is_file():
        ck.verify(folder)
        return folder
    if (folder / "adapter_config.json").is_file():
        return folder
    ckpts = [p for _, p in ck.committed(folder) if (p / "adapter_config.json").is_file()]
    if ckpts:
        ck.verify(ckpts[-1])
        log.info("%s has no final adapter (the run did not finish); using %s", folder, ckpts[-1])
        return ckpts[-1]
    return None


def run_tokenizer(cfg, adapter: Path | None, run_dir: Path, source: str):
    """The tokenizer the run trained with: saved beside the adapter or in the run folder, else built as training
    built it (lorafit.model.load_tokenizer)."""
    from transformers import AutoTokenizer

    for d in ([adapter] if adapter else []) + [run_dir]:
        if (d / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(d)
    from lorafit.model import load_tokenizer

    return load_tokenizer(cfg, source)
