"""One process's run in a run folder, in the order every run goes through, so that a mistake never costs a file:

    RunSession(cfg, layout, resume)   read-only: output.dir's checks (lorafit.run.folder), a live lock refused, a
                                      finished run recognised, the resume point verified against its manifest
    open()                            after the data is read and validated: the folder created if new, the lock
    attach(trainer)                   once the model is built: a checkpoint of another shape is refused; only then
                                      does the folder change (leftovers of interrupted saves removed, a newer
                                      lineage set aside, recipe.yaml, status.json "running", log.txt)
    save(...)                         each checkpoint (lorafit.run.commit), never of a non-finite adapter
    check_end() / finish(summary)     a non-finite adapter or a run of skipped steps fails (exit 3); else "finished"
    close()                           always (src/train.py's finally): the lock released, and status.json left in a
                                      terminal state whatever ended the run, a bug included

Everything HF Trainer needs from the run folder reaches it through LorafitTrainer (lorafit.trainer), which calls
`save` from its checkpoint writer and holds this session as `trainer.session`.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from lorafit import console, dist
from lorafit.errors import EXIT_NONFINITE, EXIT_STOPPED_TO_RESUME, RunFailed, UserError, exit_code_for
from lorafit.run import commit as ck
from lorafit.run.files import files_under, write_atomic
from lorafit.run.folder import check_output_dir
from lorafit.run.guard import StepGuard, _optimizer_steps, nonfinite_trainable
from lorafit.run.signals import StopSignals
from lorafit.run.status import RunLock, read_status, write_status

log = logging.getLogger("lorafit")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def fingerprint(model) -> dict:
    """What must match for a checkpoint to load into `model`: base architecture and every trainable tensor's shape."""
    cfg = getattr(model, "config", None)
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")
    arch = {k: getattr(cfg, k, None) for k in keys}
    # ds_shape: under ZeRO-3 a parameter's own shape is its (empty) local partition
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}
    return {"arch": arch, "trainable": shapes}


def compare(folder: Path, saved: dict, here: dict, saved_world: int | None, world: int) -> None:
    """Refuse (UserError) a checkpoint saved for another base, LoRA shape or number of processes."""
    fix = f"resume with the recipe it was saved with ({Path(folder).parent.parent}/recipe.yaml), or start a new output.dir"
    for k, v in saved.get("arch", {}).items():
        if here["arch"].get(k) != v:
            raise UserError(f"checkpoint {folder} was saved for a different base model: {k} is {v} there, "
                            f"{here['arch'].get(k)} here; {fix}")
    a, b = saved.get("trainable", {}), here["trainable"]
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[0]
        where = "only in the checkpoint" if only in a else "only in this model"
        raise UserError(f"checkpoint {folder} was saved for different LoRA targets ({len(a)} trainable tensors "
                        f"there, {len(b)} here; {only} is {where}); {fix}")
    for n in sorted(a):
        if list(a[n]) != list(b[n]):
            raise UserError(f"checkpoint {folder} was saved for a different LoRA shape: {n} is {a[n]} there, "
                            f"{b[n]} here; {fix}")
    if saved_world is not None and saved_world != world:
        raise UserError(f"checkpoint {folder} was saved by {saved_world} processes, this run has {world}; resume "
                        "with the same number of processes (optimizer shards, RNG streams and the data position "
                        "are per process), or start a new output.dir")


class RunSession:
    """See the module docstring. resume: "auto" (the newest committed checkpoint of the run folder, verified),
    "none", or a checkpoint folder (or a run folder, meaning its newest)."""

    def __init__(self, cfg, layout, resume: str = "auto"):
        self.recipe = cfg
        self.cfg = cfg.checkpoint
        self.path = Path(cfg.output.dir).expanduser()
        self.world = layout.world_size
        self.is_main = layout.is_main
        self.lock = RunLock(self.path)
        self.signals = StopSignals(on_hard_stop=self.lock.release)
        self.resume_path: str | None = None
        self.resume_step = 0
        self.saved_state: dict = {}
        self.results: dict = {}  # evaluation results for summary.json, kept in every checkpoint (lorafit.evaluate)
        self.newer: list[str] = []  # a later lineage of this folder, set aside once the resume is validated
        self.finished = False
        self.stop_reason: str | None = None  # "signal" | "nonfinite"
        self.last_checkpoint: Path | None = None
        self.guard: StepGuard | None = None
        self.trainer = None
        self.created = self.locked = self.attached = self.terminal = False
        self.on_save_event = ck._no_event  # lorafit.run.faults replaces it in the tests
        self._last_save = time.monotonic()
        decision = self._decide(resume, layout) if self.is_main else None
        decision = dist.broadcast_from_main(decision)  # collective: every rank resumes from the same checkpoint
        if decision["error"]:
            raise UserError(decision["error"])
        self.finished = decision["finished"]
        if self.finished:
            log.info("%s", decision["message"])
            return
        self.newer = decision["newer"]
        if decision["path"]:
            self.resume_path, self.resume_step = decision["path"], decision["step"]
            self.saved_state = json.loads((Path(self.resume_path) / ck.STATE).read_text())
            self.results.update(self.saved_state.get("results", {}))
            log.info("resuming from %s (step %d, verified against its manifest in %.1f s)", self.resume_path,
                     self.resume_step, decision.get("verify_s", 0.0))

    @property
    def purge_step(self) -> int | None:
        """TensorBoard purge step: events of step N were written before checkpoint-N was saved, so a resume from
        step N purges from N+1 on (what the killed run logged after its checkpoint) and keeps step N."""
        return self.resume_step + 1 if self.resume_path else None

    def _decide(self, resume: str, layout) -> dict:
        """Rank 0, read-only: nothing in the run folder changes here."""
        out = {"error": None, "finished": False, "path": None, "step": 0, "message": "", "newer": []}
        try:
            check_output_dir(self.recipe, layout)
            self.lock.refuse_if_held()
            status = read_status(self.path)
            have = ck.committed(self.path)
            if resume == "none":
                if have:
                    raise UserError(f"run folder {self.path} already holds checkpoints (newest {have[-1][1].name}); "
                                    "continue it with --resume auto, or pick a new output.dir")
                return out
            if resume == "auto":
                if status.get("state") == "finished":
                    out["finished"] = True
                    out["message"] = (f"run folder {self.path} holds a finished run ({status.get('step')} steps); "
                                      "nothing to resume. To train further, --resume one of its checkpoints with a "
                                      "larger training.max_steps; to start over, pick a new output.dir")
                    return out
                stray = [p for s, p in ck.uncommitted(self.path) if not have or s > have[-1][0]]
                if stray:
                    newest = f"; the newest committed one is {have[-1][1]}" if have else ""
                    raise UserError(
                        f"{stray[-1]} has no {ck.MANIFEST}, so lorafit never committed it (or it was damaged); --resume "
                        f"auto does not fall back to an older checkpoint on its own{newest}: resume from one with "
                        f"--resume PATH, or move {stray[-1].name} out of {stray[-1].parent}")
                if not have:
                    log.info("no checkpoint in %s: starting from step 0", self.path)
                    return out
                folder = have[-1][1]
            else:
                folder = Path(resume).expanduser()
                if not (folder / ck.MANIFEST).is_file() and ck.committed(folder):
                    folder = ck.committed(folder)[-1][1]  # a run folder: its newest checkpoint
                if not folder.is_dir():
                    raise UserError(f"--resume {resume}: no such folder; give RUN/checkpoints/checkpoint-N, a run "
                                    "folder, auto or none")
            t0 = time.perf_counter()
            manifest = ck.verify(folder)
            out["verify_s"] = round(time.perf_counter() - t0, 2)
            if not (folder / ck.STATE).is_file():
                raise UserError(f"checkpoint {folder} has no {ck.STATE}; it was not written by lorafit")
            step = int(manifest["step"])
            if folder.parent.resolve() == ck.checkpoints_dir(self.path).resolve():
                out["newer"] = [str(p) for s, p in have if s > step]
            out.update(path=str(folder), step=step)
        except UserError as e:
            out["error"] = str(e)
        return out

    # --- changing the folder, once everything is validated ---------------------------------------------------

    def open(self) -> None:
        """Create the folder if new and take the lock (every rank calls this; rank 0 does it)."""
        error = None
        if self.is_main:
            try:
                if not self.path.exists():
                    self.path.mkdir(parents=True)
                    self.created = True
                self.lock.acquire()
                self.locked = True
            except UserError as e:
                error = str(e)
            except OSError as e:
                error = f"could not create run folder {self.path} ({e.strerror}); pick another output.dir"
        error = dist.broadcast_from_main(error)  # collective: the same verdict everywhere
        if error:
            raise UserError(error)
        self.signals.install()
        if self.signals.was_blocked:
            log.info("%s arrived blocked from the launching process; unblocked, so a stop signal still checkpoints",
                     "/".join(self.signals.was_blocked))

    def attach(self, trainer) -> None:
        """Hook into a LorafitTrainer; on a resume, refuse a checkpoint of another shape. Then change the folder."""
        self.trainer = trainer
        trainer.session = self
        self.guard = StepGuard(self, trainer)
        trainer.add_callback(self.guard)
        if self.resume_path:
            # eval_on_start is the base model's baseline at step 0, which the resumed run has already logged; at the
            # resume step it would put a second eval/loss on a step the stopped run may have evaluated too.
            trainer.args.eval_on_start = False
            compare(Path(self.resume_path), self.saved_state.get("model", {}), fingerprint(trainer.model),
                    self.saved_state.get("world_size"), self.world)
            trainer.restore_logging(self.saved_state.get("logging", {}))
        if self.is_main:
            gone = ck.clean_abandoned(self.path)
            if gone:
                log.info("removed what interrupted saves left in %s: %s", ck.checkpoints_dir(self.path), ", ".join(gone))
            for newer in map(Path, self.newer):
                aside = ck.set_aside(newer)
                log.info("set %s aside as %s: it is newer than the checkpoint resumed from (deleted at the next "
                         "commit)", newer.name, aside.name)
            if self.resume_path and Path(self.resume_path).parent == ck.checkpoints_dir(self.path):
                write_atomic(ck.checkpoints_dir(self.path) / ck.LATEST, Path(self.resume_path).name + "\n")
            write_atomic(self.path / "recipe.yaml", self.recipe.to_yaml())
            write_status(self.path, "running", step=self.resume_step,
                         **({"resumed_from": self.resume_path} if self.resume_path else {}))
            console.attach_file(self.path / "log.txt")
        self.attached = True

    def time_due(self) -> bool:
        m = self.cfg.every_minutes
        return bool(m) and time.monotonic() - self._last_save >= 60.0 * m

    def _last_good(self) -> str:
        good = ck.committed(self.path)
        return f"the last good checkpoint is {good[-1][1]} (intact)" if good else "no checkpoint was committed"

    def save(self, trainer, model, trial, hf_save) -> None:
        """HF's checkpoint writer, pointed at a staging folder, then `commit` (every rank calls this)."""
        step = trainer.state.global_step
        bad = nonfinite_trainable(trainer.model)  # collective
        if bad:
            raise RunFailed(
                f"the adapter's weights are not finite at step {step} ({bad[0]}" +
                (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + f"), so no checkpoint was saved from them; "
                f"{self._last_good()}; lower training.learning_rate (or check the data) and resume from it")
        staging_root = ck.checkpoints_dir(self.path) / ck.STAGING
        t0 = time.perf_counter()
        logging_state = trainer.logging_state()  # collective: the token count sums every rank's
        try:
            trainer.staging_dir = str(staging_root)
            try:
                hf_save(model, trial)  # writes staging_root/checkpoint-N (adapter, optimizer, scheduler, RNG, state)
            finally:
                trainer.staging_dir = None
            staging = staging_root / f"{ck.PREFIX}{step}"
            if self.is_main:
                state = {"step": step, "world_size": self.world, "model": fingerprint(trainer.model),
                         **self.guard.state(), "epoch": trainer.state.epoch,
                         "data_position": {"epoch": trainer.state.epoch, "optimizer_steps": step},
                         "logging": logging_state, "results": self.results}
                (staging / ck.STATE).write_text(json.dumps(state, indent=1))
            final = ck.commit(staging, step, self.cfg.keep_last, on_event=self.on_save_event)
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            shutil.rmtree(staging_root, ignore_errors=True)  # give back what the partial save took
            raise UserError(f"{e.strerror} while saving checkpoint-{step} in {ck.checkpoints_dir(self.path)}; "
                            f"{self._last_good()}; free space on that file system, then run the same command again "
                            "(--resume auto)") from None
        self.last_checkpoint = final
        self._last_save = time.monotonic()
        size = sum(p.stat().st_size for p in files_under(final)) if self.is_main else 0
        log.info("checkpoint %s committed in %.1f s (%.1f MB)", final, time.perf_counter() - t0, size / 2**20)

    # --- the end of a run -----------------------------------------------------------------------------------

    def stopped_exit_code(self) -> int | None:
        """After train(): None if training ran to its end; else the exit code (status.json written)."""
        if self.stop_reason is None:
            return None
        step = self.trainer.state.global_step if self.trainer else 0
        ckpt = str(self.last_checkpoint) if self.last_checkpoint else None
        if self.stop_reason == "signal":
            code = EXIT_STOPPED_TO_RESUME
            log.info("stopped at step %d on a signal; checkpoint %s; resume with --resume auto (exit %d)", step, ckpt,
                     code)
            state = "stopped_to_resume"
        else:
            code = EXIT_NONFINITE
            good = ck.committed(self.path)
            last = str(good[-1][1]) if good else None
            (log.warning if self.is_main else log.debug)(
                "stopped at step %d after %d consecutive steps with a non-finite loss or gradient; the last good "
                "checkpoint is %s (intact); lower training.learning_rate or check the data, then --resume auto",
                step, self.guard.consecutive, last)
            state, ckpt = "stopped_nonfinite", last
        if self.is_main:
            write_status(self.path, state, step=step, checkpoint=ckpt, exit_code=code, **self.guard.state())
        self.terminal = True
        dist.barrier()  # collective: torchrun SIGTERMs the other ranks once one exits; status.json is written by then
        # The handlers stay installed: that SIGTERM then only sets the flag, and every rank exits with `code`.
        self.lock.release()
        return code

    def check_end(self, model) -> None:
        """After training ran to its end: refuse to call it finished when nothing was learned (RunFailed, exit 3)."""
        bad = nonfinite_trainable(model)  # collective
        if bad:
            raise RunFailed(f"the adapter's weights are not finite after step {self.trainer.state.global_step} "
                            f"({bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") +
                            f"): the run diverged, and its adapter was not saved; {self._last_good()}; lower "
                            "training.learning_rate (or check the data) and resume from it, or start over")
        g = self.guard
        if g.steps_here and g.skipped_here == g.steps_here:
            raise RunFailed(f"every one of this run's {g.steps_here} optimizer steps had a non-finite loss or "
                            f"gradient and was skipped, so nothing was learned; {self._last_good()}; lower "
                            "training.learning_rate or check the data")

    def summary_extra(self, trainer) -> dict:
        """Skip counts and per-rank optimizer step counts for summary.json (every rank calls it: a collective)."""
        import torch

        n = torch.tensor([_optimizer_steps(trainer)], dtype=torch.int64, device=trainer.args.device)
        per_rank = trainer.accelerator.gather(n).tolist()  # collective; host-device sync
        return {"skipped_steps": self.guard.skipped, "nonfinite_steps": self.guard.nonfinite,
                "optimizer_steps_per_rank": per_rank, "resumed_from": self.resume_path,
                "resumed_at_step": self.resume_step if self.resume_path else None, **self.results}

    def finish(self, summary: dict) -> None:
        if self.is_main:
            write_status(self.path, "finished", step=summary.get("steps"), exit_code=0,
                         checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)
        self.terminal = True

    def close(self) -> None:
        """Always (src/train.py's finally). A run that changed its folder and ends without a terminal status (a bug,
        a full disk, an interrupt, a failed check) gets "failed" with its exit code and the error's first line; a
        folder this invocation created for a run refused before it changed anything is removed again."""
        error = sys.exc_info()[1]
        if self.is_main and self.attached and not self.terminal:
            step = self.trainer.state.global_step if self.trainer else self.resume_step
            first = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else ""
            write_status(self.path, "failed", step=step, exit_code=exit_code_for(error),
                         error=f"{type(error).__name__}: {first}" if error is not None else "ended early",
                         checkpoint=str(ck.committed(self.path)[-1][1]) if ck.committed(self.path) else None)
            self.terminal = True
        if self.stop_reason != "signal":
            # After a stop on a signal the handlers stay: torchrun SIGTERMs the other ranks once one exits, and
            # with the handler that only sets the flag, every rank still exits with EXIT_STOPPED_TO_RESUME.
            self.signals.restore()
        self.lock.release()
        if self.created and not self.attached and isinstance(error, UserError | KeyboardInterrupt):
            console.detach_file()
            shutil.rmtree(self.path, ignore_errors=True)
