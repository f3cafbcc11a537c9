"""The non-finite policy: a step with a non-finite loss or gradient on any rank is skipped on every rank together;
too many in a row stop the run (exit 3); and an adapter whose weights are not finite is never saved or reported as
finished (`nonfinite_trainable`).
"""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback

from lorafit import dist

log = logging.getLogger("lorafit")


def nonfinite_trainable(model) -> list[str]:
    """Names of the trainable tensors holding NaN or infinity, the same list on every rank (under ZeRO-3 each rank
    checks its shards). Called at each checkpoint and at the end: one reduction and one host-device sync each."""
    import torch

    names, flags = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = dist.local_part(p)  # ZeRO-3's or FSDP2's shard, else the whole tensor
        names.append(n)
        flags.append(~torch.isfinite(t.detach()).all() if t.numel() else torch.zeros((), dtype=torch.bool,
                                                                                       device=t.device))
    if not flags:
        return []
    bad = torch.stack([f.to(flags[0].device) for f in flags]).float()
    d = dist.torch_dist()
    if d is not None and d.get_world_size() > 1:
        d.all_reduce(bad, op=d.ReduceOp.MAX)  # collective: a tensor bad on any rank is bad everywhere
    return [n for n, b in zip(names, bad.tolist()) if b > 0]  # host-device sync


def _optimizer_steps(trainer) -> int:
    """Optimizer steps applied, read from the optimizer's own state (torch and bitsandbytes Adam keep 'step');
    -1 where the optimizer keeps none (DeepSpeed's)."""
    if trainer.is_deepspeed_enabled:
        return -1
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for st in opt.state.values():
        if isinstance(st, dict) and "step" in st:
            return int(st["step"])
    return 0


class StepGuard(TrainerCallback):
    """At every optimizer step boundary, one collective decides for all ranks together: skip this step (a non-finite
    loss or gradient on any rank), stop (a signal on any rank), save (time due on rank 0's clock)."""

    def __init__(self, session, trainer):
        self.s = session
        self.t = trainer
        st = session.saved_state
        self.skipped = int(st.get("skipped_steps", 0))
        self.nonfinite = int(st.get("nonfinite_steps", 0))
        self.consecutive = int(st.get("consecutive_nonfinite", 0))
        self.steps_here = self.skipped_here = 0  # this invocation's optimizer steps, and how many were skipped
        self.bad_local = None  # device tensor: a non-finite loss in this step's micro-batches on this rank
        self.grad_norm = None
        self.step_bad = self.step_skipped = self.stop = self.due = self.poisoned = False

    def state(self) -> dict:
        return {
            "skipped_steps": self.skipped,
            "nonfinite_steps": self.nonfinite,
            "consecutive_nonfinite": self.consecutive,
        }

    def note_loss(self, loss) -> None:
        import torch

        bad = (~torch.isfinite(loss.detach())).any()  # stays on the device: no sync per micro-batch
        self.bad_local = bad if self.bad_local is None else self.bad_local | bad

    def on_pre_optimizer_step(self, args, state, control, **kw):
        import torch

        dev = args.device
        bad = torch.zeros((), dtype=torch.bool, device=dev) if self.bad_local is None else self.bad_local.to(dev)
        gn = self.grad_norm
        if getattr(self.t.accelerator, "scaler", None) is not None:
            # fp16 AMP: inf gradients with a finite loss are the GradScaler's business (it skips the step and lowers
            # the scale; several in a row are normal while it calibrates); only a non-finite loss counts here.
            gn = None
        if hasattr(gn, "full_tensor"):  # FSDP2 reports the norm as a DTensor
            gn = gn.full_tensor()  # collective
        if isinstance(gn, torch.Tensor):
            bad = bad | ~torch.isfinite(gn.detach().to(dev)).all()
        elif gn is not None and not math.isfinite(gn):
            bad = torch.ones((), dtype=torch.bool, device=dev)
        host = torch.tensor([float(self.s.signals.received is not None), float(self.s.is_main and self.s.time_due())])
        flags = torch.cat([bad.float().reshape(1), host.to(dev)])  # [non-finite, stop, save due]
        d = dist.torch_dist()
        if d is not None and d.get_world_size() > 1:
            d.all_reduce(flags, op=d.ReduceOp.MAX)  # collective, once per optimizer step: the same decision everywhere
        nonfinite, stop, due = (v > 0 for v in flags.tolist())  # host-device sync, once per optimizer step
        self.bad_local = self.grad_norm = None
        self.step_bad, self.stop, self.due = nonfinite, self.stop or stop, due
        self.step_skipped = False
        if nonfinite:
            if self.t.is_deepspeed_enabled:
                # DeepSpeed stepped inside backward(); it skips only when its own overflow check fired (fp16, ZeRO-2).
                self.step_skipped = bool(self.t.accelerator.optimizer_step_was_skipped)
                self.poisoned = self.poisoned or not self.step_skipped
            else:
                # torch and bitsandbytes optimizers leave a parameter without .grad untouched (no moment update, no
                # weight decay, no step count): with every grad cleared, optimizer.step() is a no-op on every rank.
                for group in self.t.optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
                self.step_skipped = True

    def on_step_end(self, args, state, control, **kw):
        cfg = self.s.cfg
        self.steps_here += 1
        if self.step_bad:
            self.nonfinite += 1
            self.skipped += int(self.step_skipped)
            self.skipped_here += int(self.step_skipped)
            self.consecutive += 1
            (log.warning if self.s.is_main else log.debug)(
                "step %d: non-finite loss or gradient on some rank; %s (%d in a row)",
                state.global_step,
                "optimizer step skipped on every rank"
                if self.step_skipped
                else "DeepSpeed applied it: no checkpoint will be saved from here on",
                self.consecutive,
            )
            if self.consecutive >= cfg.max_consecutive_skips:
                self.s.stop_reason = "nonfinite"
                control.should_training_stop = True
                control.should_save = False
                return control
        else:
            self.consecutive = 0
        if self.stop:
            self.s.stop_reason = "signal"
            control.should_training_stop = True
        periodic = cfg.every_steps > 0 and state.global_step % cfg.every_steps == 0
        final = state.global_step >= state.max_steps and (cfg.every_steps > 0 or cfg.every_minutes > 0)
        if (self.stop or periodic or self.due or final) and not self.poisoned:
            control.should_save = True
        return control
