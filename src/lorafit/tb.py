"""TensorBoard under <run dir>/tb, written by rank 0 only (the writer is a no-op elsewhere).

Our own callback rather than transformers' TensorBoardCallback: it names tags the way lorafit documents them
(train/loss, train/tokens_per_second, eval/perplexity, ...), writes the resolved recipe as text, and opens the
writer with purge_step on a resume so TensorBoard drops events past the checkpoint instead of showing duplicates.
"""

from __future__ import annotations

import math
import numbers

from transformers import TrainerCallback

# transformers' log keys -> our tags (everything else from training goes under train/<key>)
_RENAME = {"train_loss": None, "total_flos": None, "train_runtime": None, "train_samples_per_second": None,
           "train_steps_per_second": None, "num_input_tokens_seen": "train/tokens_seen"}


class RankZeroWriter:
    """A SummaryWriter on the main process, opened at its first use (training has begun: the run folder is
    validated and may change); every method is a no-op on other ranks."""

    def __init__(self, log_dir: str | None, is_main: bool, purge_step: int | None = None):
        self._w = None
        self._args = (log_dir, purge_step) if is_main and log_dir else None

    def __getattr__(self, name):
        if self._w is None and self._args is not None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir, purge_step = self._args
            self._w = SummaryWriter(log_dir=log_dir, purge_step=purge_step)
        if self._w is None:
            return lambda *a, **k: None
        return getattr(self._w, name)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def tag_for(key: str) -> str | None:
    if key in _RENAME:
        return _RENAME[key]
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if "/" in key:
        return key
    return "train/" + key


class TensorBoardLogger(TrainerCallback):
    def __init__(self, writer: RankZeroWriter, recipe_yaml: str):
        self.w = writer
        self.recipe_yaml = recipe_yaml

    def on_train_begin(self, args, state, control, **kw):
        self.w.add_text("recipe", "```yaml\n" + self.recipe_yaml + "\n```", 0)

    def on_log(self, args, state, control, logs=None, **kw):
        for key, value in (logs or {}).items():
            tag = tag_for(key)
            if tag is None or not isinstance(value, numbers.Number) or isinstance(value, bool):
                continue
            self.w.add_scalar(tag, value, state.global_step)
            if key == "eval_loss":
                self.w.add_scalar("eval/perplexity", math.exp(min(value, 50.0)), state.global_step)
        self.w.flush()

    def on_train_end(self, args, state, control, **kw):
        self.w.flush()


def read_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard folder, {tag: [(step, value), ...]}, read back with tensorboard's own reader
    (for tests and bench/ scripts; training never reads events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

