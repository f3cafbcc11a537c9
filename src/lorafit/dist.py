"""What the processes of one run share: inputs prepared once, one verdict on failure, per-rank memory figures.

`main_first(fn, is_local_main)` runs `fn` on each machine's main process while the other processes wait, then on
the others, which find its work in a cache. Waiting happens in a gloo group with a long timeout, so tokenizing a
large dataset does not trip the default process group's timeout (NCCL's watchdog aborts after `ddp_timeout`). After
each phase every rank learns how the others fared: a user's mistake on the main process (a malformed row, say) is
raised as the same UserError on every rank, so all of them exit with code 2 instead of waiting in a collective for a
process that is gone.

`prepare_data(cfg, tokenizer, is_local_main)` is what `fn` calls for the data: the local main process tokenizes and,
when there are several processes, writes the result under `<cache>/prepared/<key>`; the others load it. The key
(`lorafit.data.cache_key`) covers the data recipe, the tokenizer, the source files' sizes and times, and lorafit's
formatting code, so a cache entry is never stale and is written once, atomically, never overwritten.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from lorafit.errors import UserError

log = logging.getLogger("lorafit")
T = TypeVar("T")

# How long the other processes wait for a main process that prepares inputs. Generous: tokenizing millions of rows
# takes long; a main process that dies instead is noticed by the launcher, which stops the whole job.
PREPARE_TIMEOUT = timedelta(hours=4)
_wait_group = None
_user_error_exit = False


def _dist():
    import torch.distributed as d

    return d if d.is_available() and d.is_initialized() else None


def _group():
    """A gloo group over all ranks, used only to wait on and share the outcome of input preparation."""
    global _wait_group
    d = _dist()
    if _wait_group is None:
        _wait_group = d.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)  # collective: every rank creates it
    return _wait_group


def _share_outcome(failure: tuple[str, str] | None) -> tuple[int, str, str] | None:
    """Every rank's failure (kind, message) or None; returns the lowest failing rank's, the same on every rank."""
    d = _dist()
    outcomes: list = [None] * d.get_world_size()
    d.all_gather_object(outcomes, failure, group=_group())  # collective (gloo, CPU only): waits for every rank
    for rank, out in enumerate(outcomes):
        if out is not None:
            return rank, out[0], out[1]
    return None


def _exit_as_user_error_on_sigterm() -> None:
    # Every rank now stops with the same user error. The launcher (torchrun) terminates the remaining ranks as soon
    # as the first one exits; a rank caught by that SIGTERM on its way out would report -15 instead of 2. Ignoring it
    # (SIG_IGN, unlike a Python handler, survives interpreter shutdown) lets each rank finish exiting with code 2; a
    # rank stuck on the way out is still killed by the launcher's SIGKILL after its grace period.
    global _user_error_exit
    _user_error_exit = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _at_exit() -> None:
    # Registered when lorafit.dist is imported, before any hook registered at run time, so it runs after them (atexit
    # is last-in first-out): after lorafit.checkpoint has restored the signal handlers it installed.
    if _user_error_exit:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def release_groups() -> None:
    # Every rank is here together, just after the shared verdict and before anyone exits. Process groups still alive
    # when a peer process has exited abort the process at shutdown ("terminate called without an active exception",
    # SIGABRT: 3 runs in 6 on CPU); destroyed now, while all peers are alive, every rank exits with its own code.
    global _wait_group
    d = _dist()
    if d is not None:
        d.destroy_process_group()
    _wait_group = None


atexit.register(_at_exit)


def _phase(fn: Callable[[], T], active: bool) -> T | None:
    result, failure, error = None, None, None
    if active:
        try:
            result = fn()
        except UserError as e:
            failure, error = ("user", str(e)), e
        except Exception as e:
            failure, error = ("bug", f"{type(e).__name__}: {e}"), e
    verdict = _share_outcome(failure)
    if verdict is None:
        return result
    rank, kind, message = verdict
    release_groups()  # the run ends here on every rank: no collective follows
    if kind == "user":
        _exit_as_user_error_on_sigterm()
        raise UserError(message) from None
    if error is not None:
        raise error  # a bug keeps its own traceback on the rank where it happened
    raise RuntimeError(f"rank {rank} failed while preparing inputs ({message}); see its traceback")


def main_first(fn: Callable[[], T], is_local_main: bool) -> T:
    if _dist() is None:
        return fn()
    _group()  # created now, while every rank is here: creating it is itself a collective on the default group
    first = _phase(fn, is_local_main)  # the local main processes fill the caches; the others wait
    later = _phase(fn, not is_local_main)  # the others read them
    return first if is_local_main else later


# ----------------------------------------------------------------------------------------------------------------
# The prepared-data cache


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
    from lorafit import data, tasks

    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (data, tasks))).hexdigest()[:16]


def cache_path(cfg, tokenizer) -> Path:
    from lorafit import data
    from lorafit.model import cache_dir

    key = data.cache_key(cfg, _tokenizer_id(tokenizer), extra=_source_id(cfg.path) + _code_id())
    return cache_dir() / "prepared" / key


def _fields_known(prepared) -> None:
    known = {"train", "eval", "eval_conversations", "renderer", "stats"}
    new = {f.name for f in dataclasses.fields(prepared)} - known
    if new:  # a bug in lorafit, not the user's: the cache would silently drop these
        raise RuntimeError(f"lorafit.data.Prepared gained fields {sorted(new)}; teach lorafit.dist to cache them")


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
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, path)
    except OSError:
        if not path.exists():  # another machine's main process may have won the rename; that copy is identical
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_prepared(path: Path, cfg, tokenizer):
    import datasets

    from lorafit import data

    meta = json.loads((path / "meta.json").read_text())
    stats = data.DataStats(**meta["stats"])
    convs = [
        data.Conversation(turns=[tuple(t) for t in c["turns"]], system=c["system"]) for c in meta["eval_conversations"]
    ]
    return data.Prepared(
        train=datasets.load_from_disk(str(path / "train")),
        eval=datasets.load_from_disk(str(path / "eval")) if (path / "eval").exists() else None,
        eval_conversations=convs,
        renderer=data.make_renderer(tokenizer, stats.format, cfg),
        stats=stats,
    )


def cacheable_across_runs(cfg) -> bool:
    """Local files (their sizes and times are in the key) and synthetic data (seeded, its code is in the key); not
    hub ids, whose content can change under the same name."""
    return cfg.cache and (cfg.path.startswith("synthetic:") or Path(cfg.path).expanduser().exists())


def prepare_data(cfg, tokenizer, is_local_main: bool):
    """Tokenize on the local main process (and cache it when there are other processes); load it elsewhere. A single
    process reuses what an earlier run tokenized (data.cache): 2.3 s for guanaco-llama2-1k on our CPU machine,
    0.01 s to load."""
    from lorafit import data

    d = _dist()
    if d is None or d.get_world_size() == 1:
        if not cacheable_across_runs(cfg):
            return data.prepare(cfg, tokenizer)
        path = cache_path(cfg, tokenizer)
        if (path / "meta.json").exists():
            try:
                prepared = load_prepared(path, cfg, tokenizer)
                log.info("data: tokenized rows from %s (an earlier run's; data.cache=false to redo)", path)
                return prepared
            except Exception as e:  # a damaged cache entry is not the user's problem: tokenize again
                log.warning("data: could not read the cached rows in %s (%s); tokenizing again", path, e)
                shutil.rmtree(path, ignore_errors=True)
        prepared = data.prepare(cfg, tokenizer)
        try:
            save_prepared(prepared, path)
        except OSError as e:
            log.warning("data: could not cache the tokenized rows in %s (%s)", path, e)
        return prepared
    path = cache_path(cfg, tokenizer)
    if is_local_main:
        prepared = data.prepare(cfg, tokenizer)
        save_prepared(prepared, path)
        return prepared
    if not (path / "meta.json").exists():  # e.g. LORAFIT_CACHE differs between the processes of one machine
        log.warning("prepared data not found in %s; tokenizing on this process too", path)
        return data.prepare(cfg, tokenizer)
    return load_prepared(path, cfg, tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Per-rank memory


def memory_per_rank(model) -> dict:
    """Bytes of parameters each rank holds (ZeRO-3: its shards) and each rank's peak CUDA memory, as lists by rank.

    Called on every rank; the lists are complete on every rank (rank 0 writes them to summary.json).
    """
    import torch

    held = 0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)  # ZeRO-3 keeps this rank's shard here; p itself is empty between uses
        t = p if t is None else t
        held += t.numel() * t.element_size()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    mine = {"param_bytes": held, "peak_cuda_bytes": peak}
    d = _dist()
    if d is None:
        ranks = [mine]
    else:
        ranks = [None] * d.get_world_size()
        d.all_gather_object(ranks, mine, group=_group())  # collective (gloo): one small dict from every rank
    out = {"param_bytes_per_rank": [r["param_bytes"] for r in ranks]}
    if peak is not None:
        out["peak_gpu_memory_gib_per_rank"] = [round(r["peak_cuda_bytes"] / 2**30, 3) for r in ranks]
    return out
