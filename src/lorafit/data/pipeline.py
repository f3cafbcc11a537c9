"""The whole preparation: read, validate, split (a seeded held-out split) and tokenize, with counts of what was
skipped and truncated. The output feeds TRL's SFTTrainer as an already tokenized dataset (TRL builds labels from
`completion_mask`, pads and packs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from lorafit.data.formats import Conversation, RowError, detect_format, to_conversation
from lorafit.data.render import make_renderer
from lorafit.data.sources import Rows, _where, read_source
from lorafit.errors import UserError
from lorafit.recipe import DataConfig

log = logging.getLogger("lorafit")




@dataclass
class DataStats:
    source: str = ""
    format: str = ""
    renderer: str = ""
    rows: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    skipped_rows: int = 0
    truncated_rows: int = 0
    dropped_fully_truncated: int = 0
    train_tokens: int = 0
    train_answer_tokens: int = 0
    eval_tokens: int = 0  # what one evaluation scores (eval_num_tokens)
    encoded_rows: int = 0  # train and eval rows tokenized (before any was dropped)
    answers_cut: int = 0  # rows whose answer lost its end (its EOS) to data.max_length
    longest_tokens: int = 0  # the longest row, before truncation
    skipped_examples: list[str] = field(default_factory=list)

    def summary_line(self) -> str:
        return (f"data: {self.rows} rows ({self.format} format, {self.renderer} rendering) from {self.source} -> "
                f"{self.train_rows} train / {self.eval_rows} eval; {self.truncated_rows} truncated to max_length, "
                f"{self.skipped_rows} skipped; {self.train_tokens:,} train tokens "
                f"({self.train_answer_tokens:,} carry loss)")


@dataclass
class Prepared:
    train: Any  # datasets.Dataset with input_ids, completion_mask
    eval: Any | None
    eval_conversations: list[Conversation]
    renderer: Any
    stats: DataStats


def _encode_all(convs, renderer, cfg: DataConfig, stats: DataStats, count_train: bool):
    ids_col, mask_col = [], []
    for conv in convs:
        enc = renderer.encode(conv)
        ids, mask = enc.input_ids, enc.completion_mask
        if not cfg.completion_only:
            mask = [1] * len(ids)
        stats.encoded_rows += 1
        stats.longest_tokens = max(stats.longest_tokens, len(ids))
        if len(ids) > cfg.max_length:  # also when packing: TRL's bfd would cut it silently
            stats.truncated_rows += 1
            stats.answers_cut += any(mask[cfg.max_length:])  # an answer token (its EOS at least) is cut off
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
            if not any(mask):
                stats.dropped_fully_truncated += 1  # the prompt alone fills max_length: nothing left to learn
                continue
        ids_col.append(ids)
        mask_col.append(mask)
        if count_train:
            stats.train_tokens += len(ids)
            stats.train_answer_tokens += sum(mask)
        else:
            stats.eval_tokens += len(ids)
    return {"input_ids": ids_col, "completion_mask": mask_col}


def prepare(cfg: DataConfig, tokenizer) -> Prepared:
    """Read, validate, split and tokenize. Raises UserError naming the file and row of the first bad row."""
    import datasets

    skipped: list[str] = []
    rows = read_source(cfg, skipped)
    read_skipped = len(skipped)
    if cfg.max_rows:
        rows = Rows(rows.records[: cfg.max_rows], rows.origins[: cfg.max_rows], rows.description)
    if not rows.records and skipped:
        raise UserError(f"{rows.description}: every row was skipped as malformed, e.g. {skipped[0]}")
    if not rows.records:
        raise UserError(f"{rows.description} has no rows; point data.path at a non-empty dataset")
    columns = set().union(*(r.keys() for r in rows.records[:100]))
    fmt = detect_format(columns, cfg, rows.description)
    convs: list[tuple[int, Conversation]] = []
    for i, rec in enumerate(rows.records):
        try:
            convs.append((i, to_conversation(rec, fmt, cfg)))
        except RowError as e:
            msg = f"{_where(rows, i)} {e}"
            if cfg.bad_rows == "fail":
                raise UserError(f"{msg} (set data.bad_rows=skip to skip such rows)") from None
            skipped.append(msg)
    if not convs:
        raise UserError(f"{rows.description}: every row was skipped as malformed, e.g. {skipped[0]}")
    # rows counts unparseable lines too, so that rows = train + eval + skipped (+ dropped as too long).
    stats = DataStats(source=rows.description, format=fmt, rows=len(rows.records) + read_skipped,
                      skipped_rows=len(skipped), skipped_examples=skipped[:5])
    for msg in skipped[:5]:
        log.warning("skipped: %s", msg)

    # Deterministic held-out split: a seeded permutation of row indices, independent of the tokenizer.
    n_eval = int(round(len(convs) * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
    if cfg.eval_fraction > 0 and n_eval == 0:
        n_eval = 1
    if cfg.eval_max_rows is not None:
        n_eval = min(n_eval, cfg.eval_max_rows)
    order = list(range(len(convs)))
    import random

    random.Random(cfg.seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train_convs = [c for j, (_, c) in enumerate(convs) if j not in eval_idx]
    eval_convs = [c for j, (_, c) in enumerate(convs) if j in eval_idx]
    if not train_convs:
        raise UserError(f"data.eval_fraction={cfg.eval_fraction} leaves no training rows; lower it")

    renderer = make_renderer(tokenizer, fmt, cfg)
    stats.renderer = renderer.name
    try:
        train = _encode_all(train_convs, renderer, cfg, stats, True)
        evald = _encode_all(eval_convs, renderer, cfg, stats, False) if eval_convs else None  # counts truncation
    except RowError as e:  # template-level problems are not tied to one row
        raise UserError(f"{rows.description}: {e}") from None
    stats.train_rows = len(train["input_ids"])
    stats.eval_rows = len(evald["input_ids"]) if evald else 0
    if stats.train_rows == 0:
        raise UserError(f"every training row's prompt is longer than data.max_length={cfg.max_length}; raise it")
    if eval_convs and stats.eval_rows == 0:
        raise UserError(f"every one of the {len(eval_convs)} held-out rows' prompts is longer than data.max_length="
                        f"{cfg.max_length}, so there is nothing to evaluate; raise data.max_length, or set "
                        "data.eval_fraction=0")
    return Prepared(
        train=datasets.Dataset.from_dict(train),
        eval=datasets.Dataset.from_dict(evald) if evald else None,
        eval_conversations=eval_convs,
        renderer=renderer,
        stats=stats,
    )


def check_truncation(stats: DataStats, cfg: DataConfig, is_main: bool = True) -> None:
    """Refuse rows that would all lose the end of their answer (the model would never see an answer end, and never
    learn to stop); warn, with the numbers and the max_length that would fit, when many rows are cut or any answer.
    Every rank calls it (the same stats: the same verdict); rank 0 warns."""
    n = stats.encoded_rows
    if not n or not stats.truncated_rows:
        return
    fits = -(-stats.longest_tokens // 64) * 64  # rounded up to a multiple of 64
    if stats.answers_cut == n and not cfg.allow_truncated_answers:
        raise UserError(f"every one of the {n:,} rows is longer than data.max_length={cfg.max_length} and loses the "
                        f"end of its answer (the longest has {stats.longest_tokens:,} tokens), so the model would never "
                        f"learn to stop; set data.max_length={fits} to fit them, or data.allow_truncated_answers=true")
    if is_main and (stats.truncated_rows > cfg.truncation_warning * n or stats.answers_cut):
        log.warning("data: %s of %s rows are longer than data.max_length=%d (the longest has %s tokens) and %s lose "
                    "the end of their answer; data.max_length=%d would fit every row", f"{stats.truncated_rows:,}",
                    f"{n:,}", cfg.max_length, f"{stats.longest_tokens:,}", f"{stats.answers_cut:,}", fits)
