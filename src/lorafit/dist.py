"""Distributed helpers that are safe when the main process fails.

`main_first(fn)` runs `fn` on the (local) main process first while the others wait at a barrier, then on the others,
which find its cache. If the main process raises (a user's bad data, say), it still reaches the barrier, so the other
ranks are released, run `fn` themselves, hit the same error and exit the same way instead of hanging in a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # collective: every rank of the group must reach it


def main_first(fn: Callable[[], T], is_local_main: bool) -> T:
    if not is_local_main:
        _barrier()  # wait for the main process to fill the cache
        return fn()
    try:
        return fn()
    finally:
        _barrier()  # release the waiting ranks, also when fn raised
