"""RUN/summary.json: what a run did (steps, losses, tokens, rates, memory, data counts, evaluation results), from the
trainer's log history and lorafit's counters, so that a resumed run's summary covers the whole run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from lorafit import mfu
from lorafit.dist import memory_per_rank
from lorafit.fused import counts as fused_counts


def write_summary(run_dir: Path, cfg, layout, trainer, prepared, wall: float, trainable: int,
                  extra: dict | None = None) -> dict:
    """summary.json (rank 0 writes it; every rank calls this: the token and memory figures are collectives)."""
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
        "first_losses": losses[:10],
        "tokens_seen": tokens,
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else None,
        # what one optimizer step sees, all ranks together (with packing a "row" is a packed sequence):
        # tokens_per_step tokens in effective_batch rows
        "tokens_per_step": round(tokens / max(trainer.state.global_step, 1), 1),
        "wall_time_s": round(wall, 2),
        "layout": layout.kind,
        "world_size": layout.world_size,
        "effective_batch": layout.effective_batch,
        "trainable_parameters": trainable,
        "fused_4bit_layers": fused_counts(trainer.model),
        "data": {k: v for k, v in vars(prepared.stats).items() if k != "skipped_examples"},
    }
    summary.update(memory_per_rank(trainer.model))  # collective: every rank's peak and parameter bytes, by rank
    if "peak_gpu_memory_gib_per_rank" in summary:
        summary["peak_gpu_memory_gib"] = summary["peak_gpu_memory_gib_per_rank"][layout.rank]  # this rank's
    summary.update(steady_figures(hist))
    ratio = mfu.datasheet_ratio()
    if ratio and "steady_mfu" in summary:  # both bases (lorafit.mfu): the measured 790 TFLOP/s and the datasheet's
        summary["steady_mfu_datasheet"] = round(summary["steady_mfu"] * ratio, 4)
    # seconds per optimizer step over each logging interval, in order (warm-up included): a run's slow stretches
    summary["logged_step_times_s"] = [h["step_time"] for h in hist if "step_time" in h]
    if evals:
        summary["eval_loss_final"] = evals[-1]
        summary["eval_loss_best"] = min(evals)
        summary["eval_perplexity_final"] = math.exp(min(evals[-1], 50.0))
    summary.update(extra or {})
    if layout.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def steady_figures(hist: list[dict]) -> dict:
    """Steady-state rates from the trainer's log history, skipping the first two timed logs (warm-up, compilation):
    the median of each logged rate, and the time-weighted mean tokens/s (all their tokens over all their time), which
    is steadier than a median of rates where the per-step rate swings with the rows drawn (padded batches)."""
    steady = [h for h in hist if "tokens_per_second" in h][2:]
    out = {}
    for key, name in (("tokens_per_second", "steady_tokens_per_second"), ("step_time", "steady_step_time_s"),
                      ("mfu", "steady_mfu")):
        if steady and all(key in h for h in steady):
            out[name] = statistics.median_high(h[key] for h in steady)
    if steady and all("step_time" in h for h in steady):
        out["steady_tokens_per_second_mean"] = round(
            sum(h["tokens_per_second"] * h["step_time"] for h in steady) / sum(h["step_time"] for h in steady), 2)
    return out
