"""Data sources: read the raw rows of `data.path`, each with the file and row it came from, so that an error names them.

Sources: a hub id, a local parquet / jsonl / json / csv file, a folder of them (split by file name as on the hub), a
`datasets` saved folder, or `synthetic:<task>` (lorafit's own generated data, lorafit.data.tasks).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from lorafit.data.formats import render_llama2_text
from lorafit.errors import UserError
from lorafit.hub import DATA_SUFFIXES, looks_local
from lorafit.recipe import DataConfig

FILE_SUFFIXES = set(DATA_SUFFIXES)




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
                except RecursionError:  # json's parser recurses once per nesting level
                    obj, err = None, "is nested too deeply to be a row (thousands of levels of [ or {)"
                else:
                    err = None if isinstance(obj, dict) else "is not a JSON object"
                if err:
                    _bad_row(f"{path} line {n} {err}", "fix the line or set data.bad_rows=skip", bad_rows, skipped)
                    continue
                recs.append(obj)
                origins.append((str(path), f"line {n}"))
    elif suffix == ".json":
        try:
            obj = json.loads(path.read_bytes())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        except RecursionError:
            raise UserError(f"{path} is nested too deeply to be a list of rows; fix the file") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start + 1}); save the file as UTF-8") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"data": [...]}
        if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
            raise UserError(f"{path} must hold a JSON list of objects (one per row), or be JSON lines")
        recs = obj
        origins = [(str(path), f"row {i}") for i in range(len(obj))]
    elif suffix == ".csv":
        recs, origins = _read_csv(path, bad_rows, skipped)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            recs = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise UserError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
        origins = [(str(path), f"row {i}") for i in range(len(recs))]
    return recs, origins


def _bad_row(msg: str, remedy: str, bad_rows: str, skipped: list[str]) -> None:
    """data.bad_rows for one unreadable row: `fail` stops with its line and what to do, `skip` adds it to `skipped`
    (the data line counts them, lorafit.data.pipeline)."""
    if bad_rows == "fail":
        raise UserError(f"{msg}; {remedy}")
    skipped.append(msg)


def _read_csv(path: Path, bad_rows: str, skipped: list[str]) -> tuple[list[dict], list[tuple[str, str]]]:
    # The csv module refuses a field over 128 KiB by default (a long document is not a mistake; data.max_length
    # truncates it later), and DictReader files a row's extra fields under the key None (which would reach the
    # format detection as a column named None): such a row is named here instead.
    csv.field_size_limit(2**31 - 1)
    recs: list[dict] = []
    origins: list[tuple[str, str]] = []
    try:  # utf-8-sig: a byte-order mark (Excel writes one) would otherwise stick to the first column's name
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            for i, row in enumerate(reader):
                if None in row:  # more fields than the header names
                    header = len(reader.fieldnames or [])
                    msg = (f"{path} row {i} (line {reader.line_num}) has {header + len(row[None])} fields, the header "
                           f"names {header}")
                    _bad_row(msg, "quote fields that hold commas, or set data.bad_rows=skip", bad_rows, skipped)
                    continue
                recs.append(row)
                origins.append((str(path), f"row {i}"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start + 1}); save the file as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path} is not a readable CSV file ({e}); fix the file") from None
    return recs, origins


def _looks_like_jsonl(path: Path) -> bool:
    with path.open("rb") as fh:
        first = fh.readline().removeprefix(b"\xef\xbb\xbf").strip()
        second = fh.readline().strip()
    return first.startswith(b"{") and second.startswith(b"{")


def read_source(cfg: DataConfig, skipped: list[str]) -> Rows:
    """Read the raw rows of `cfg.path`."""
    if cfg.path.startswith("synthetic:"):
        from lorafit.data import tasks

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
    if looks_local(cfg.path):
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
