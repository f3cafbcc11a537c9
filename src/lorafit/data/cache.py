"""The prepared-data cache: tokenized rows kept under `$LORAFIT_CACHE/prepared/<key>` and reused.

`prepare_data(cfg, tokenizer, is_local_main)` is what each process calls (under lorafit.dist.main_first): the local
main process tokenizes and, when there are several processes, writes the result; the others load it. A single process
reuses what an earlier run tokenized (`data.cache`). The key covers only what changes the tokenized rows: the data
section (but packing, padding-free batches and the cache switch, which change only how TRL collates the same rows),
the tokenizer, the source files' sizes and times, and lorafit's data code. An entry is written once, atomically, never
overwritten, and carries the size and sha256 of each of its files: a damaged entry (even a same-size change) is
noticed on load and tokenized again, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lorafit import dist
from lorafit.data.formats import Conversation
from lorafit.data.pipeline import DataStats, Prepared, check_truncation, prepare
from lorafit.data.render import make_renderer
from lorafit.recipe import DataConfig

log = logging.getLogger("lorafit")


def _tokenizer_id(tok) -> str:
    """Changes whenever tokenization could: vocabulary, merges, normalizer, special tokens, chat template."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    extra = json.dumps(
        [
            tok.name_or_path,
            type(tok).__name__,
            tok.bos_token,
            tok.eos_token,
            tok.pad_token,
            getattr(tok, "chat_template", None),
        ],
        default=str,
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def _source_id(path: str) -> str:
    """Sizes and modification times of local data files (a changed file changes the key); hub ids stand for
    themselves."""
    p = Path(path).expanduser()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
    return json.dumps([(str(q), q.stat().st_size, q.stat().st_mtime_ns) for q in files])


def _code_id() -> str:
    """lorafit's reading, formatting and tokenizing code: every module of this package."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()[:16]


# Fields of the data section that do not change the tokenized rows: packing and padding-free batches are TRL's
# collation of the same rows, and `cache` is this switch. Toggling them reuses the entry.
NOT_IN_KEY = frozenset({"packing", "padding_free", "cache"})


def cache_key(cfg: DataConfig, tokenizer_id: str, extra: str = "") -> str:
    """Key of prepared data: what changes tokenization (the data section but NOT_IN_KEY, the tokenizer, the source
    files, lorafit's data code)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    blob = json.dumps({"data": fields, "tok": tokenizer_id, "v": 2, "x": extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(cfg: DataConfig, tokenizer) -> Path:
    from lorafit.source import cache_dir

    return cache_dir() / "prepared" / cache_key(cfg, _tokenizer_id(tokenizer), extra=_source_id(cfg.path) + _code_id())


def _fields_known(prepared) -> None:
    known = {"train", "eval", "eval_conversations", "renderer", "stats"}
    new = {f.name for f in dataclasses.fields(prepared)} - known
    if new:  # a bug in lorafit, not the user's: the cache would silently drop these
        raise RuntimeError(f"lorafit.data.Prepared gained fields {sorted(new)}; teach lorafit.data.cache to keep them")


def save_prepared(prepared, path: Path) -> None:
    """Write once: into a temporary folder, then renamed into place (a reader never sees half a cache)."""
    _fields_known(prepared)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        prepared.train.save_to_disk(str(tmp / "train"))
        if prepared.eval is not None:
            prepared.eval.save_to_disk(str(tmp / "eval"))
        meta = {
            "stats": dataclasses.asdict(prepared.stats),
            "eval_conversations": [dataclasses.asdict(c) for c in prepared.eval_conversations],
            "files": _digests(tmp),  # checked on every load: a damaged entry is tokenized again, never used
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, path)
    except OSError:
        if not path.exists():  # another machine's main process may have won the rename; that copy is identical
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _digests(folder: Path) -> dict[str, list]:
    """[size, sha256] of every file under `folder` but meta.json, by relative path."""
    from lorafit.run.files import sha256

    return {str(p.relative_to(folder)): [p.stat().st_size, sha256(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "meta.json"}


class DamagedCache(Exception):
    """A cache entry whose files differ from what was written (sizes and sha256 in its meta.json)."""


def load_prepared(path: Path, cfg, tokenizer) -> Prepared:
    import datasets

    meta = json.loads((path / "meta.json").read_text())
    found, want = _digests(path), meta.get("files")
    if want is None:
        raise DamagedCache("it has no list of its files")
    for name in sorted(want):  # files datasets adds later (its own map caches) are not ours to check
        if found.get(name) != want[name]:
            raise DamagedCache(f"{name} is {'missing' if name not in found else 'changed since written'}")
    stats = DataStats(**meta["stats"])
    convs = [Conversation(turns=[tuple(t) for t in c["turns"]], system=c["system"]) for c in meta["eval_conversations"]]
    return Prepared(
        train=datasets.load_from_disk(str(path / "train")),
        eval=datasets.load_from_disk(str(path / "eval")) if (path / "eval").exists() else None,
        eval_conversations=convs,
        renderer=make_renderer(tokenizer, stats.format, cfg),
        stats=stats,
    )


def cacheable_across_runs(cfg) -> bool:
    """Local files (their sizes and times are in the key) and synthetic data (seeded, its code is in the key); not
    hub ids, whose content can change under the same name."""
    return cfg.cache and (cfg.path.startswith("synthetic:") or Path(cfg.path).expanduser().exists())


def prepare_data(cfg: DataConfig, tokenizer, is_local_main: bool) -> Prepared:
    """The tokenized rows (`_prepare_data`: this process's, a cache entry's or the local main process's), checked for
    rows that lose their answers to data.max_length (lorafit.data.pipeline.check_truncation) on every path."""
    prepared = _prepare_data(cfg, tokenizer, is_local_main)
    check_truncation(prepared.stats, cfg, dist.is_main())
    return prepared


def _prepare_data(cfg: DataConfig, tokenizer, is_local_main: bool) -> Prepared:
    """Tokenize on the local main process (and cache it when there are other processes); load it elsewhere. A single
    process reuses what an earlier run tokenized (data.cache): 2.3 s for guanaco-llama2-1k on our CPU machine,
    0.01 s to load."""
    if dist.world_size() == 1:
        if not cacheable_across_runs(cfg):
            return prepare(cfg, tokenizer)
        path = cache_path(cfg, tokenizer)
        if (path / "meta.json").exists():
            try:
                prepared = load_prepared(path, cfg, tokenizer)
                log.info("data: tokenized rows from %s (an earlier run's; data.cache=false to redo)", path)
                return prepared
            except Exception as e:  # a damaged cache entry is not the user's problem: tokenize again
                log.warning("data: the cached rows in %s are damaged (%s); tokenizing again", path, e)
                shutil.rmtree(path, ignore_errors=True)
        prepared = prepare(cfg, tokenizer)
        try:
            save_prepared(prepared, path)
        except OSError as e:
            log.warning("data: could not cache the tokenized rows in %s (%s)", path, e)
        return prepared
    path = cache_path(cfg, tokenizer)
    if is_local_main:
        prepared = prepare(cfg, tokenizer)
        save_prepared(prepared, path)
        return prepared
    if not (path / "meta.json").exists():  # e.g. LORAFIT_CACHE differs between the processes of one machine
        log.warning("prepared data not found in %s; tokenizing on this process too", path)
        return prepare(cfg, tokenizer)
    try:
        return load_prepared(path, cfg, tokenizer)
    except DamagedCache as e:
        log.warning("the prepared data in %s is damaged (%s); tokenizing on this process too", path, e)
        return prepare(cfg, tokenizer)
