"""Fault injection for the tests: kill a save at a chosen point, send a signal at a chosen step, make a step's loss NaN,
or run the disk out of space during a save. Off the production path: nothing here is called unless `install` found
one of these variables in the environment (the CLI tests set them):

    LORAFIT_TEST_KILL_AT=I        SIGKILL rank LORAFIT_TEST_KILL_RANK (default 0) at the I-th event of a save,
                                  truncating the file it was about to sync (as if killed mid-write), optionally only
                                  during the save of step LORAFIT_TEST_KILL_STEP
    LORAFIT_TEST_SIGNAL_AT=R:S    SIGUSR1 to rank R at the start of optimizer step S
    LORAFIT_TEST_NAN_AT=R:S[-T]   rank R's loss is NaN at steps S..T
    LORAFIT_TEST_ENOSPC_AT=S      the save of step S fails with "No space left on device" after its first file
    LORAFIT_TEST_POISON_AT=S      after optimizer step S, one LoRA weight of rank 0 holds NaN (a diverged adapter
                                  whose losses were all finite)
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from lorafit import dist

VARIABLES = ("LORAFIT_TEST_KILL_AT", "LORAFIT_TEST_SIGNAL_AT", "LORAFIT_TEST_NAN_AT", "LORAFIT_TEST_ENOSPC_AT",
             "LORAFIT_TEST_POISON_AT")


def wanted() -> bool:
    return any(os.environ.get(v) for v in VARIABLES)


class _KillHook:
    """LORAFIT_TEST_KILL_AT (see the module docstring): a deterministic kill -9 at one point of a save."""

    def __init__(self):
        at = os.environ.get("LORAFIT_TEST_KILL_AT")
        self.at = int(at) if at else None
        self.step = int(os.environ.get("LORAFIT_TEST_KILL_STEP", "-1"))
        self.rank = int(os.environ.get("LORAFIT_TEST_KILL_RANK", "0"))
        self.n = 0

    def __call__(self, step: int, event: str, path: Path | None = None, truncate: bool = False) -> None:
        if self.at is None or dist.rank() != self.rank or (self.step >= 0 and step != self.step):
            return
        if self.n == self.at:
            if truncate and path is not None and path.is_file():
                os.truncate(path, path.stat().st_size // 2)
            os.write(2, f"lorafit test hook: SIGKILL at save event {self.n} ({event} {path or ''})\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)
        self.n += 1




def hook_fires(var: str, step: int) -> bool:
    """A RANK:STEP or RANK:FIRST-LAST test hook (see the module docstring) that names this rank and step."""
    v = os.environ.get(var)
    if not v:
        return False
    r, _, steps = v.partition(":")
    first, _, last = steps.partition("-")
    return int(r) == dist.rank() and int(first) <= step <= int(last or first)


def _nan_loss(out):
    return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")


def install(trainer, session) -> None:
    """Wire the hooks the environment asks for into one run: the session's save events, a signal at a step's start,
    a NaN loss, a full disk (called by src/train.py only when `wanted()`)."""
    if os.environ.get("LORAFIT_TEST_KILL_AT"):
        session.on_save_event = _KillHook()
    if os.environ.get("LORAFIT_TEST_ENOSPC_AT"):
        full_at = int(os.environ["LORAFIT_TEST_ENOSPC_AT"])
        inner = session.on_save_event

        def disk_full(step: int, event: str, path: Path | None = None, truncate: bool = False) -> None:
            inner(step, event, path, truncate)
            if step == full_at and event == "file":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        session.on_save_event = disk_full
    from transformers import TrainerCallback

    if os.environ.get("LORAFIT_TEST_POISON_AT"):
        poison_at = int(os.environ["LORAFIT_TEST_POISON_AT"])

        class PoisonAt(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step == poison_at and dist.rank() == 0:
                    import torch

                    p = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
                    with torch.no_grad():
                        p.view(-1)[0] = float("nan")

        trainer.callback_handler.callbacks.insert(0, PoisonAt())  # before the session's guard saves the step

    if os.environ.get("LORAFIT_TEST_SIGNAL_AT"):

        class SignalAt(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if hook_fires("LORAFIT_TEST_SIGNAL_AT", state.global_step + 1):
                    os.kill(os.getpid(), signal.SIGUSR1)

        trainer.add_callback(SignalAt())
    if os.environ.get("LORAFIT_TEST_NAN_AT"):
        compute_loss = trainer.compute_loss  # whatever computes the loss (TRL's or lorafit's lean path)

        def nan_at(*a, **kw):
            out = compute_loss(*a, **kw)
            return _nan_loss(out) if trainer.model.training and hook_fires("LORAFIT_TEST_NAN_AT",
                                                                            trainer.state.global_step + 1) else out

        trainer.compute_loss = nan_at
