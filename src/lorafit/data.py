"""Data: read a source, turn each row into a conversation, render and tokenize it with a completion-only loss mask.

Sources: a hub id, a local parquet / jsonl / json / csv file, a folder of them, a `datasets` saved folder, or
`synthetic:<task>` (lorafit's own generated data, see `lorafit.tasks`).

Formats, detected from the columns unless `data.format` names one:
- `llama2`: pre-rendered Llama-2 chat text, `<s>[INST] q [/INST] a </s>` repeated per turn (guanaco-llama2-1k);
- `alpaca`: instruction / input / output columns;
- `messages`: a list of {role, content}, rendered with the tokenizer's chat template (Llama-2's if it has none).

Every row becomes a `Conversation`; a renderer turns it into `input_ids` and a `completion_mask` (1 = answer token,
carries loss). The mask boundary comes from tokenizing the prompt alone and prompt+answer and taking the prompt's
length — the way a prompt is tokenized at inference — never from searching for `[/INST]` token ids, which Llama-2's
tokenizer splits differently depending on what precedes them. The output feeds TRL's SFTTrainer as an already
tokenized dataset (TRL builds labels from `completion_mask`, pads and packs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafit.errors import UserError
from lorafit.recipe import DataConfig

log = logging.getLogger("lorafit")

FILE_SUFFIXES = {".parquet", ".jsonl", ".json", ".csv"}


# ----------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class Rows:
    """Raw rows plus where each came from, so an error can name the file and row."""

    records: list[dict]
    origins: list[tuple[str, str]]  # (file or hub id, "row N" / "line N")
    description: str


def _where(rows: Rows, i: int) -> str:
    src, pos = rows.origins[i]
    return f"{src} {pos}"


def _read_file(path: Path, bad_rows: str, skipped: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    # Local files are read here rather than through datasets.load_dataset: its builders report a malformed line
    # as an arrow/json traceback without the file and line, and cannot skip it.
    suffix = path.suffix.lower()
    recs: list[dict] = []
    origins: list[tuple[str, str]] = []
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_jsonl(path)):
        # Bytes, so that one line in another encoding is a bad row (named, skippable) rather than a crash, and a
        # UTF-8 byte-order mark (Windows editors write one) is accepted: json.loads detects both.
        with path.open("rb") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    obj, err = None, f"is not valid JSON ({e.msg} at column {e.colno})"
                except UnicodeDecodeError as e:
                    obj, err = None, f"is not UTF-8 text (byte {e.start + 1})"
                else:
                    err = None if isinstance(obj, dict) else "is not a JSON object"
                if err:
                    msg = f"{path} line {n} {err}"
                    if bad_rows == "fail":
                        raise UserError(f"{msg}; fix the line or set data.bad_rows=skip")
                    skipped.append(msg)
                    continue
                recs.append(obj)
                origins.append((str(path), f"line {n}"))
    elif suffix == ".json":
        try:
            obj = json.loads(path.read_bytes())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start + 1}); save the file as UTF-8") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"data": [...]}
        if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
            raise UserError(f"{path} must hold a JSON list of objects (one per row), or be JSON lines")
        recs = obj
        origins = [(str(path), f"row {i}") for i in range(len(obj))]
    elif suffix == ".csv":
        try:  # utf-8-sig: a byte-order mark (Excel writes one) would otherwise stick to the first column's name
            with path.open(encoding="utf-8-sig", newline="") as fh:
                recs = list(csv.DictReader(fh))
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start + 1}); save the file as UTF-8") from None
        origins = [(str(path), f"row {i}") for i in range(len(recs))]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            recs = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise UserError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
        origins = [(str(path), f"row {i}") for i in range(len(recs))]
    return recs, origins


def _looks_like_jsonl(path: Path) -> bool:
    with path.open("rb") as fh:
        first = fh.readline().removeprefix(b"\xef\xbb\xbf").strip()
        second = fh.readline().strip()
    return first.startswith(b"{") and second.startswith(b"{")


def read_source(cfg: DataConfig, skipped: list[str]) -> Rows:
    """Read the raw rows of `cfg.path`."""
    if cfg.path.startswith("synthetic:"):
        from lorafit import tasks

        task = cfg.path.split(":", 1)[1]
        exs = tasks.generate(task, cfg.synthetic_rows, cfg.seed)
        recs = [{"text": render_llama2_text(e.prompt, e.answer), "prompt": e.prompt, "answer": e.answer}
                for e in exs]
        return Rows(recs, [(cfg.path, f"row {i}") for i in range(len(recs))], f"synthetic task {task}")
    p = Path(cfg.path).expanduser()
    if p.is_file():
        if p.suffix.lower() not in FILE_SUFFIXES:
            raise UserError(f"data.path {p} has an unsupported type; use parquet, jsonl, json or csv")
        recs, origins = _read_file(p, cfg.bad_rows, skipped)
        return Rows(recs, origins, str(p))
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise UserError(f"{p} has no split '{cfg.split}'; set data.split to one of {sorted(ds)}")
                ds = ds[cfg.split]
            return Rows(ds.to_list(), [(str(p), f"row {i}") for i in range(len(ds))], str(p))
        files = _split_files(p, cfg.split)
        if not files:
            raise UserError(f"data.path {p} is a folder with no parquet, jsonl, json or csv files")
        recs, origins = [], []
        for q in files:
            r, o = _read_file(q, cfg.bad_rows, skipped)
            recs += r
            origins += o
        return Rows(recs, origins, f"{p} ({len(files)} files)")
    if _looks_like_local(cfg.path):
        raise UserError(f"data.path {cfg.path} does not exist; give an existing file or folder, or a hub dataset id")
    return _read_hub(cfg)


def _split_files(folder: Path, split: str) -> list[Path]:
    """The data files of `split` in a folder, told apart by names the way `datasets` does (data/train-0000.parquet,
    test.jsonl, validation/...), so a hub snapshot's test split is not trained on; unnamed files are all `train`."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = {str(k): v for k, v in get_data_patterns(str(folder)).items()}
    except FileNotFoundError:  # datasets' EmptyDatasetError: no files at all
        return []
    if split not in patterns:
        raise UserError(f"data.path {folder} holds the splits {sorted(patterns)} (by file name), not '{split}'; "
                        "set data.split")
    found = DataFilesDict.from_patterns({split: patterns[split]}, base_path=str(folder))[split]
    return sorted(Path(q) for q in found if Path(q).suffix.lower() in FILE_SUFFIXES)


def _looks_like_local(path: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else is meant as a local path."""
    return (path.startswith((".", "/", "~")) or path.count("/") >= 2
            or Path(path).suffix.lower() in FILE_SUFFIXES)


def _read_hub(cfg: DataConfig) -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    except Exception as e:  # network, auth, missing dataset: all a user's fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load dataset '{cfg.path}' (split {cfg.split}) from the hub: {first}; "
            "for offline use give a local path with --set data.path=/path/to/data"
        ) from None
    return Rows(ds.to_list(), [(cfg.path, f"row {i}") for i in range(len(ds))], f"{cfg.path} [{cfg.split}]")


# ----------------------------------------------------------------------------------------------------------------
# Rows -> conversations


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


# ----------------------------------------------------------------------------------------------------------------
# Rendering and tokenization


@dataclass
class Encoded:
    input_ids: list[int]
    completion_mask: list[int]


def _ids(tokenizer, text: str) -> list[int]:
    # verbose=False: lorafit truncates to data.max_length itself and counts it, so the tokenizer's warning about
    # model_max_length would only be noise on stderr.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _split(tokenizer, prompt: str, full: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` and of the answer that follows it in `full`.

    The answer's ids are those of `full` past the prompt's own tokenization: what a model sees at inference after
    a prompt tokenized alone. If tokenizing `full` merges across the boundary (the prompt's ids are not a prefix),
    the prompt's ids are kept and the answer is tokenized after them from the remaining text.
    """
    p = _ids(tokenizer, prompt)
    whole = _ids(tokenizer, full)
    if whole[: len(p)] == p:
        return p, whole[len(p):]
    return p, _ids(tokenizer, full[len(prompt):])


class Llama2Renderer:
    """`<s>[INST] {user} [/INST] {answer} </s>` per turn, with the tokenizer's own BOS and EOS ids.

    Literal `<s>` / `</s>` in the data are parsed away (they would otherwise become a second BOS next to the one the
    tokenizer adds); each turn then starts with exactly one BOS id and each answer ends with the EOS id, as in Meta's
    Llama-2 chat format.
    """

    name = "llama2"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id

    def prompt_text(self, user: str, system: str | None, first: bool) -> str:
        if system and first:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        return f"[INST] {user.strip()} [/INST]"

    def encode(self, conv: Conversation) -> Encoded:
        ids: list[int] = []
        mask: list[int] = []
        for k, (user, answer) in enumerate(conv.turns):
            if not user and k == 0 and not conv.system:  # plain text (completion_only off): all of it is answer
                a = _ids(self.tok, answer)
                ids += self.bos + a + [self.eos]
                mask += [0] * len(self.bos) + [1] * (len(a) + 1)
                continue
            prompt = self.prompt_text(user, conv.system, k == 0)
            answer = answer.strip()
            # An empty answer renders as the prompt alone: `prompt + " "` would add a lone space token as "answer".
            p, a = _split(self.tok, prompt, f"{prompt} {answer}") if answer else (_ids(self.tok, prompt), [])
            ids += self.bos + p + a + [self.eos]
            # A turn with an empty answer (guanaco-llama2-1k row 899 has one) stays as context but carries no loss:
            # training its lone EOS would teach the model to answer some prompts with nothing.
            mask += [0] * (len(self.bos) + len(p)) + [1 if a else 0] * (len(a) + 1)
        return Encoded(ids, mask)

    def prompt_ids(self, user: str, system: str | None = None) -> list[int]:
        """What generation feeds the model for a one-turn prompt."""
        return self.bos + _ids(self.tok, self.prompt_text(user, system, True))


class TemplateRenderer:
    """The tokenizer's chat template; the answer of turn k is what the template adds after the generation prompt."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id

    def _apply(self, msgs, gen: bool) -> list[int]:
        out = self.tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def _messages(self, conv: Conversation, upto: int) -> list[dict]:
        msgs = [{"role": "system", "content": conv.system}] if conv.system else []
        for user, answer in conv.turns[:upto]:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return msgs

    def encode(self, conv: Conversation) -> Encoded:
        ids: list[int] = []
        mask: list[int] = []
        rendered: list[int] = []  # the template's own tokens so far (`ids` may also hold EOS ids added below)
        for k, (user, _answer) in enumerate(conv.turns):
            prefix = self._messages(conv, k) + [{"role": "user", "content": user}]
            prompt = self._apply(prefix, gen=True)
            full = self._apply(self._messages(conv, k + 1), gen=False)
            if prompt[: len(rendered)] != rendered or full[: len(prompt)] != prompt:
                raise RowError("the chat template renders earlier turns differently once later turns are added, "
                               "so the answer boundary is ambiguous; use data.chat_template=llama2")
            answer, tail = full[len(prompt):], []
            if self.eos is not None and self.eos in answer:
                # Loss ends at the answer's EOS: what the template adds after it (ChatML's newline) is turn
                # separator, context for the next turn, and never generated (generation stops at EOS).
                cut = len(answer) - answer[::-1].index(self.eos)
                answer, tail = answer[:cut], answer[cut:]
            elif self.eos is not None:
                answer = answer + [self.eos]  # the template ends turns without EOS: add it so the model learns to stop
            ids += prompt[len(rendered):] + answer + tail
            mask += [0] * (len(prompt) - len(rendered)) + [1] * len(answer) + [0] * len(tail)
            rendered = full
        bos = self.tok.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:  # template and tokenizer both add BOS
            ids, mask = ids[1:], mask[1:]
        return Encoded(ids, mask)

    def prompt_ids(self, user: str, system: str | None = None) -> list[int]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self._apply(msgs, gen=True)


def make_renderer(tokenizer, fmt: str, cfg: DataConfig):
    if fmt == "llama2" or cfg.chat_template == "llama2":
        return Llama2Renderer(tokenizer)
    if cfg.chat_template == "tokenizer" or getattr(tokenizer, "chat_template", None):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("data.chat_template=tokenizer but the tokenizer has no chat template; use auto or llama2")
        return TemplateRenderer(tokenizer)
    return Llama2Renderer(tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# The whole preparation


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
        if len(ids) > cfg.max_length:  # also when packing: TRL's bfd would cut it silently
            stats.truncated_rows += 1
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
            if not any(mask):
                stats.dropped_fully_truncated += 1  # the prompt alone fills max_length: nothing left to learn
                continue
        ids_col.append(ids)
        mask_col.append(mask)
        if count_train:
            stats.train_tokens += len(ids)
            stats.train_answer_tokens += sum(mask)
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
    return Prepared(
        train=datasets.Dataset.from_dict(train),
        eval=datasets.Dataset.from_dict(evald) if evald else None,
        eval_conversations=eval_convs,
        renderer=renderer,
        stats=stats,
    )


def cache_key(cfg: DataConfig, tokenizer_id: str, extra: str = "") -> str:
    """Key of prepared data: the data recipe, the tokenizer and lorafit's formatting version."""
    blob = json.dumps({"data": asdict(cfg), "tok": tokenizer_id, "v": 1, "x": extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
