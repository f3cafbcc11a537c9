"""Training progress on the console: one bar in a terminal, one line per logging step elsewhere, one line per
evaluation.

Replaces HF Trainer's ProgressCallback and PrinterCallback, which print each log as a Python dict and draw the
evaluation's own bar inside the training bar (raw cursor-up codes in a file or a CI log). Here:
- a terminal (stdout is a tty) with `logging.progress_bar` on gets one tqdm bar with the latest loss and real
  tokens/s beside it; anything else (a Slurm log, a pipe, progress_bar off) gets one line per logging step;
- each evaluation ends with one line: step, eval loss, perplexity, rows;
- rank 0 only. TensorBoard and summary.json keep every number; this is only what a person watches.
"""

from __future__ import annotations

import logging
import math
import sys

from transformers import TrainerCallback

log = logging.getLogger("lorafit")


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class TrainProgress(TrainerCallback):
    def __init__(self, is_main: bool, progress_bar: bool, eval_rows: int = 0, stream=None):
        self.is_main = is_main
        # stdout, where lorafit's lines go: accelerate launch (1.16) pipes its child's stderr through a thread of its
        # own, so a terminal is only ever seen on stdout
        self.stream = stream or sys.stdout
        self.use_bar = is_main and progress_bar and self.stream.isatty()
        self.bar = None
        self.eval_rows = eval_rows

    def on_train_begin(self, args, state, control, **kw):
        if not self.use_bar:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True, file=self.stream,
                        unit="step", desc="train")

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if not self.is_main or not logs or "loss" not in logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}", f"loss {_num(logs['loss'])}"]
        for key, name in (("learning_rate", "lr"), ("grad_norm", "grad norm")):
            if key in logs:
                parts.append(f"{name} {_num(logs[key])}")
        if "tokens_per_second" in logs:
            parts.append(f"{logs['tokens_per_second']:,.0f} tok/s")
        if logs.get("skipped_steps"):
            parts.append(f"{logs['skipped_steps']} skipped")
        # With a bar the line goes to the run's log file only; the bar shows the loss and the rate
        log.info("%s", ", ".join(parts), extra={"file_only": self.bar is not None})
        if self.bar is not None:
            post = {"loss": _num(logs["loss"])}
            if "tokens_per_second" in logs:
                post["tok/s"] = f"{logs['tokens_per_second']:,.0f}"
            self.bar.set_postfix(post, refresh=True)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if not self.is_main or not metrics or "eval_loss" not in metrics:
            return
        loss = metrics["eval_loss"]
        ppl = math.exp(min(loss, 50.0))
        rows = f" on {self.eval_rows} held-out rows" if self.eval_rows else ""
        secs = f" ({metrics['eval_runtime']:.1f} s)" if "eval_runtime" in metrics else ""
        log.info("eval at step %d: loss %.4g, perplexity %.4g%s%s", state.global_step, loss, ppl, rows, secs)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
