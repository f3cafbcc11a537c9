"""Row formats: turn each raw row into a `Conversation` (turns of user and assistant text, an optional system prompt).

Formats, detected from the columns unless `data.format` names one:
- `llama2`: pre-rendered Llama-2 chat text, `<s>[INST] q [/INST] a </s>` repeated per turn (guanaco-llama2-1k);
- `alpaca`: instruction / input / output columns;
- `messages`: a list of {role, content}.
A malformed row raises RowError; the caller adds the file and row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lorafit.errors import UserError
from lorafit.recipe import DataConfig


@dataclass
class Conversation:
    turns: list[tuple[str, str]]  # (user, assistant)
    system: str | None = None


class RowError(Exception):
    """A malformed row; the caller adds file and row."""


_LLAMA2_TURN = re.compile(r"^\s*(?:<s>)?\s*\[INST\](?P<user>.*?)\[/INST\](?P<answer>.*)$", re.S)
_SYS = re.compile(r"^\s*<<SYS>>\s*(?P<sys>.*?)\s*<</SYS>>\s*(?P<rest>.*)$", re.S)


def render_llama2_text(prompt: str, answer: str, system: str | None = None) -> str:
    """One turn as Llama-2 chat text, the form guanaco-llama2-1k stores."""
    if system:
        prompt = f"<<SYS>>\n{system}\n<</SYS>>\n\n{prompt}"
    return f"<s>[INST] {prompt} [/INST] {answer} </s>"


def parse_llama2(text: str, completion_only: bool) -> Conversation:
    """Split pre-rendered Llama-2 chat text into turns."""
    chunks = [c for c in text.split("</s>") if c.strip()]
    if not chunks:
        raise RowError("is empty")
    turns: list[tuple[str, str]] = []
    system = None
    for k, chunk in enumerate(chunks):
        m = _LLAMA2_TURN.match(chunk)
        if not m:
            if "[INST]" in chunk:
                raise RowError("has an [INST] with no closing [/INST]; every turn needs '[INST] question [/INST] "
                               "answer'")
            if completion_only:
                raise RowError("has no '[INST] ... [/INST]' prompt, so there is no answer part to train on; "
                               "fix the row or set data.completion_only=false")
            turns.append(("", chunk.replace("<s>", "").strip()))
            continue
        user, answer = m.group("user").strip(), m.group("answer").strip()
        if k == 0:
            s = _SYS.match(user)
            if s:
                system, user = s.group("sys").strip(), s.group("rest").strip()
        turns.append((user, answer))
    if completion_only and not any(a for _, a in turns):
        raise RowError("has no answer after [/INST]; fix the row or set data.completion_only=false")
    return Conversation(turns, system)


def _text(value: Any, column: str) -> str:
    if value is None:  # a jsonl row without the key, or a null cell in parquet/arrow
        raise RowError(f"has no value in column '{column}'")
    if not isinstance(value, str):
        raise RowError(f"column '{column}' is {type(value).__name__}, not text")
    return value


def to_conversation(rec: dict, fmt: str, cfg: DataConfig) -> Conversation:
    if fmt == "llama2":
        text = _text(rec.get(cfg.text_column), cfg.text_column)
        if not text.strip():
            raise RowError(f"column '{cfg.text_column}' is empty")
        conv = parse_llama2(text, cfg.completion_only)
    elif fmt == "alpaca":
        inst = _text(rec.get("instruction"), "instruction")
        inp = rec.get("input") or ""
        inp = _text(inp, "input")
        out = _text(rec.get("output"), "output")
        if not inst.strip():
            raise RowError("column 'instruction' is empty")
        if not out.strip():
            raise RowError("column 'output' is empty: there is no answer to train on")
        conv = Conversation([(inst.strip() + (f"\n\n{inp.strip()}" if inp.strip() else ""), out.strip())])
    elif fmt == "messages":
        msgs = rec.get(cfg.messages_column)
        if not isinstance(msgs, list) or not msgs:
            raise RowError(f"column '{cfg.messages_column}' must be a non-empty list of {{role, content}}")
        system, turns, pending = None, [], None
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RowError(f"message {j} must be an object with 'role' and 'content'")
            role, content = m["role"], _text(m["content"], f"{cfg.messages_column}[{j}].content")
            if role == "system" and j == 0:
                system = content
            elif role == "user" and pending is None:
                pending = content
            elif role == "assistant" and pending is not None:
                if not content.strip():
                    raise RowError(f"message {j} (assistant) is empty: there is no answer to train on")
                turns.append((pending, content))
                pending = None
            else:
                raise RowError(f"message {j} has role '{role}' out of order; expected [system], user, assistant, ...")
        if not turns:
            raise RowError("has no assistant message: there is no answer to train on")
        conv = Conversation(turns, system)
    else:  # pragma: no cover - guarded by the recipe's Literal
        raise ValueError(fmt)
    if conv.system is None and cfg.system_prompt:
        conv.system = cfg.system_prompt
    return conv


def detect_format(columns: set[str], cfg: DataConfig, description: str) -> str:
    if cfg.format != "auto":
        need = {"llama2": {cfg.text_column}, "alpaca": {"instruction", "output"},
                "messages": {cfg.messages_column}}[cfg.format]
        missing = need - columns
        if missing:
            raise UserError(f"{description}: format '{cfg.format}' needs column(s) {sorted(missing)}, found "
                            f"{sorted(columns)}; set data.format or the column name (data.text_column)")
        return cfg.format
    if cfg.messages_column in columns:
        return "messages"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if cfg.text_column in columns:
        return "llama2"
    raise UserError(
        f"{description}: cannot tell the format from columns {sorted(columns)}; expected '{cfg.text_column}' "
        f"(Llama-2 chat text), instruction/input/output (alpaca) or '{cfg.messages_column}' (chat); "
        "set data.format and data.text_column / data.messages_column"
    )
