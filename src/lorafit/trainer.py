"""Trainer assembly: TRL's SFTTrainer configured from the recipe and the layout, plus lorafit's callbacks.

TRL builds labels from our `completion_mask`, pads or packs, and runs HF Trainer's loop (optimizer, schedule,
accumulation, clipping, DDP/DeepSpeed through accelerate, progress bar). What we add: real-token accounting without a
device sync per step, TensorBoard tags, and the run summary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from trl import SFTConfig, SFTTrainer

from lorafit.layout import Layout
from lorafit.recipe import Recipe

log = logging.getLogger("lorafit")
REAL_TOKENS_KEY = "lorafit_real_tokens"


def build_args(cfg: Recipe, layout: Layout, run_dir: str, has_eval: bool) -> SFTConfig:
    """Training arguments. Built before the model loads: under ZeRO-3 this is what makes from_pretrained shard."""
    t = cfg.training
    on_gpu = layout.device != "cpu"
    eval_strategy = "steps" if (has_eval and t.eval_steps) else "no"
    return SFTConfig(
        output_dir=run_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=on_gpu and cfg.quantization.compute_dtype == "bfloat16",
        fp16=on_gpu and cfg.quantization.compute_dtype == "float16",
        use_cpu=not on_gpu,
        gradient_checkpointing=False,  # already enabled on the model by lorafit.model with the layout's mode
        ddp_find_unused_parameters=layout.ddp_find_unused_parameters,
        logging_steps=cfg.logging.steps,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=not cfg.logging.progress_bar,
        save_strategy="no",
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps if eval_strategy == "steps" else None,
        dataloader_num_workers=t.dataloader_num_workers,
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        completion_only_loss=cfg.data.completion_only,
        dataset_num_proc=None,
    )


class CountingCollator:
    """Wraps TRL's collator: counts real (non-pad) tokens of each batch on the host, where it costs no sync."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner(examples)
        batch[REAL_TOKENS_KEY] = sum(len(ex["input_ids"]) for ex in examples)
        return batch


class LorafitTrainer(SFTTrainer):
    """SFTTrainer that counts real tokens and reports tokens/s at each log."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.data_collator = CountingCollator(self.data_collator)
        self.real_tokens_local = 0
        self._last_log = (time.perf_counter(), 0)

    def training_step(self, model, inputs, *a, **kw):
        self.real_tokens_local += int(inputs.pop(REAL_TOKENS_KEY, 0))
        return super().training_step(model, inputs, *a, **kw)

    def prediction_step(self, model, inputs, *a, **kw):
        inputs.pop(REAL_TOKENS_KEY, None)
        return super().prediction_step(model, inputs, *a, **kw)

    def real_tokens_total(self) -> int:
        import torch

        t = torch.tensor([self.real_tokens_local], dtype=torch.int64, device=self.args.device)
        # Collective: sums every rank's host-side count; runs only at logging steps and at the end.
        return int(self.accelerator.reduce(t, reduction="sum").item())  # host-device sync

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training log (not eval): add real tokens/s since the previous one
            now = time.perf_counter()
            total = self.real_tokens_total()
            t0, n0 = self._last_log
            if now > t0:
                logs["tokens_per_second"] = round((total - n0) / (now - t0), 2)
            logs["tokens_seen"] = total
            self._last_log = (now, total)
        super().log(logs, start_time)


def build_trainer(cfg: Recipe, args: SFTConfig, model, tokenizer, prepared, callbacks) -> LorafitTrainer:
    return LorafitTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def write_summary(run_dir: Path, cfg: Recipe, layout: Layout, trainer: LorafitTrainer, prepared, wall: float,
                  trainable: int, extra: dict | None = None) -> dict:
    hist = trainer.state.log_history
    losses = [h["loss"] for h in hist if "loss" in h]
    evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
    tokens = trainer.real_tokens_total()  # collective (all ranks call write_summary)
    summary = {
        "recipe": cfg.name,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else None,
        "wall_time_s": round(wall, 2),
        "layout": layout.kind,
        "world_size": layout.world_size,
        "effective_batch": layout.effective_batch,
        "trainable_parameters": trainable,
        "data": {k: v for k, v in vars(prepared.stats).items() if k != "skipped_examples"},
    }
    if evals:
        summary["eval_loss_final"] = evals[-1]
        summary["eval_loss_best"] = min(evals)
        summary["eval_perplexity_final"] = math.exp(min(evals[-1], 50.0))
    summary.update(extra or {})
    if layout.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
