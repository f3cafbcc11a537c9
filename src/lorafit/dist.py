"""Process helpers, the one home for "which process am I" and the collectives lorafit makes outside the training loop.

    rank(), world_size(), local_rank(), is_main(), is_local_main()   # from the process group, else the launcher's env
    barrier(), broadcast_from_main(obj), gather_objects(obj)          # collectives (no-ops with one process)
    main_first(fn, is_local_main)                                     # run fn on each machine's main process first

torch is looked up, not imported: without torch.distributed in the process there is no process group, and the
helpers answer from the variables the launcher set (RANK, WORLD_SIZE, LOCAL_RANK), which is also what they mean
before the process group exists. So lorafit.console and the checkpoint commit protocol can use them in a bare Python
process.

`main_first(fn, is_local_main)` runs `fn` on each machine's main process while the other processes wait, then on
the others, which find its work in a cache. Waiting happens in a gloo group with a long timeout, so tokenizing a
large dataset does not trip the default process group's timeout (NCCL's watchdog aborts after `ddp_timeout`). After
each phase every rank learns how the others fared: a user's mistake on the main process (a malformed row, say) is
raised as the same UserError on every rank, so all of them exit with code 2 instead of waiting in a collective for a
process that is gone.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from lorafit.errors import UserError

T = TypeVar("T")


def torch_dist():
    """torch.distributed when a process group is up, else None (never imports torch)."""
    d = sys.modules.get("torch.distributed")
    return d if d is not None and d.is_available() and d.is_initialized() else None


def rank() -> int:
    d = torch_dist()
    return d.get_rank() if d else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    d = torch_dist()
    return d.get_world_size() if d else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine (LOCAL_RANK, set by every launcher lorafit supports)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 of the whole run: the one process that logs, writes the run folder and reports."""
    return rank() == 0


def is_local_main() -> bool:
    """The first process of its machine: the one that prepares what every process of the machine reads."""
    return local_rank() == 0


def barrier() -> None:
    d = torch_dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()  # collective: every rank of the group must reach it


def broadcast_from_main(obj: Any) -> Any:
    d = torch_dist()
    if d is None or d.get_world_size() == 1:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)  # collective: rank 0's object to every rank (a host-device sync on NCCL)
    return box[0]


def gather_objects(obj: Any) -> list:
    """Every rank's `obj`, by rank, on every rank (a small picklable object; gloo, CPU only)."""
    d = torch_dist()
    if d is None:
        return [obj]
    out: list = [None] * d.get_world_size()
    d.all_gather_object(out, obj, group=_group())  # collective (gloo): waits for every rank
    return out


# How long the other processes wait for a main process that prepares inputs. Generous: tokenizing millions of rows
# takes long; a main process that dies instead is noticed by the launcher, which stops the whole job.
PREPARE_TIMEOUT = timedelta(hours=4)
_wait_group = None
_user_error_exit = False


def _group():
    """A gloo group over all ranks, used only to wait on and share the outcome of input preparation."""
    global _wait_group
    d = torch_dist()
    if _wait_group is None:
        _wait_group = d.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)  # collective: every rank creates it
    return _wait_group


def _share_outcome(failure: tuple[str, str] | None) -> tuple[int, str, str] | None:
    """Every rank's failure (kind, message) or None; returns the lowest failing rank's, the same on every rank."""
    for rank, out in enumerate(gather_objects(failure)):  # collective
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
    # is last-in first-out): after lorafit.run.session has restored the signal handlers it installed.
    if _user_error_exit:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def release_groups() -> None:
    # Every rank is here together, just after the shared verdict and before anyone exits. Process groups still alive
    # when a peer process has exited abort the process at shutdown ("terminate called without an active exception",
    # SIGABRT: 3 runs in 6 on CPU); destroyed now, while all peers are alive, every rank exits with its own code.
    global _wait_group
    d = torch_dist()
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
    if torch_dist() is None:
        return fn()
    _group()  # created now, while every rank is here: creating it is itself a collective on the default group
    first = _phase(fn, is_local_main)  # the local main processes fill the caches; the others wait
    later = _phase(fn, not is_local_main)  # the others read them
    return first if is_local_main else later


# ----------------------------------------------------------------------------------------------------------------
# Per-rank memory


def local_part(p):
    """The part of a parameter this rank holds: ZeRO-3's shard (p itself is empty between uses), FSDP2's local shard
    of a DTensor, or the whole parameter."""
    t = getattr(p, "ds_tensor", None)
    if t is not None:
        return t
    return p.to_local() if hasattr(p, "to_local") else p


def memory_per_rank(model) -> dict:
    """Bytes of parameters each rank holds (ZeRO-3: its shards) and each rank's peak CUDA memory, as lists by rank.

    Called on every rank; the lists are complete on every rank (rank 0 writes them to summary.json).
    """
    import torch

    held = 0
    for p in model.parameters():
        t = local_part(p)
        held += t.numel() * t.element_size()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    ranks = gather_objects({"param_bytes": held, "peak_cuda_bytes": peak})  # collective: a small dict per rank
    out = {"param_bytes_per_rank": [r["param_bytes"] for r in ranks]}
    if peak is not None:
        out["peak_gpu_memory_gib_per_rank"] = [round(r["peak_cuda_bytes"] / 2**30, 3) for r in ranks]
    return out
