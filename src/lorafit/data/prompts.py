"""Prompts to answer from a file, for batch generation (src/generate.py --input): one per row, in any supported row
format, with the reference answer where the row has one.

A row is either `{"prompt": ..., ["system": ...], ["reference" | "answer": ...]}` or a training row of any format
lorafit reads (Llama-2 text, alpaca, messages), whose first turn gives the prompt and its answer the reference. The
prompt is rendered later exactly as the run trained (the run's renderer); the row's format only says where it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lorafit.data.formats import RowError, detect_format, to_conversation
from lorafit.data.sources import FILE_SUFFIXES, _read_file
from lorafit.errors import UserError
from lorafit.recipe import DataConfig


@dataclass(frozen=True)
class PromptRow:
    user: str
    system: str | None = None
    reference: str | None = None


def read_prompts(path: Path, cfg: DataConfig) -> list[PromptRow]:
    """Every row of `path` as a prompt (UserError naming the file and row for one without a prompt)."""
    if not path.is_file():
        raise UserError(f"--input {path}: no such file; give a jsonl, json, csv or parquet file of prompts")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"--input {path} has an unsupported type; use jsonl, json, csv or parquet")
    records, origins = _read_file(path, "fail", [])
    if not records:
        raise UserError(f"--input {path} has no rows")
    columns = set().union(*(r.keys() for r in records[:100]))
    out = []
    if "prompt" in columns:
        for rec, (src, pos) in zip(records, origins):
            user = rec.get("prompt")
            if not isinstance(user, str) or not user.strip():
                raise UserError(f"{src} {pos} has no text in column 'prompt'; give every row a prompt")
            ref = rec.get("reference", rec.get("answer"))
            out.append(PromptRow(user, rec.get("system") or cfg.system_prompt, ref if isinstance(ref, str) else None))
        return out
    # A training row: its format from its columns, answers optional (a prompt alone is a row to answer)
    lenient = dataclasses.replace(cfg, format="auto", completion_only=False)
    fmt = detect_format(columns, lenient, str(path))
    for rec, (src, pos) in zip(records, origins):
        try:
            conv = to_conversation(rec, fmt, lenient)
        except RowError as e:
            raise UserError(f"{src} {pos} {e}") from None
        user, answer = conv.turns[0]
        if not user.strip():
            raise UserError(f"{src} {pos} has no prompt; give every row a question to answer")
        out.append(PromptRow(user, conv.system, answer.strip() or None))
    return out
