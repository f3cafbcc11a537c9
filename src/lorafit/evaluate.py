"""Evaluation beyond the loss: greedy sample answers logged as TensorBoard text, and the held-out metric.

The eval loss itself is HF Trainer's (`eval_strategy`, `eval_on_start`; TensorBoard tags from `lorafit.tb`). This
module adds what the Trainer has no notion of:

- sample answers: a few fixed prompts (`eval.prompts`, else the first held-out ones) answered greedily after each
  evaluation and written as text `eval/sample_<i>`, so a user watches the answers change;
- the held-out metric (`eval.metric`: exact, contains, regex; lorafit.metrics): greedy answers to the first
  `eval.metric_rows` held-out prompts scored against their reference answers, before the first step and after the
  last (and at each evaluation with `eval.metric_at_eval_steps`), for any dataset: `eval/<metric>` in TensorBoard,
  `<metric>_before` / `<metric>_after` in summary.json, and every prompt, reference, answer and score in
  RUN/eval/predictions-before.jsonl / -after.jsonl (-step-N.jsonl). On `synthetic:<task>` data `auto` is exact.

Who generates: rank 0 alone, except under ZeRO-3 and FSDP2. There every rank holds a shard of each weight and a forward
gathers them with collectives, so a forward on rank 0 alone would hang; every rank then generates the same prompts
with `synced_gpus=True` (a rank whose sequences finished keeps joining the others' forwards) and only rank 0 writes.
Elsewhere the other ranks skip generation and wait for rank 0 at the next collective of the training loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from lorafit import metrics
from lorafit.recipe import Recipe

log = logging.getLogger("lorafit")


@dataclass(frozen=True)
class Prompt:
    user: str
    system: str | None = None
    reference: str | None = None  # the held-out answer, when the prompt comes from the eval split


def held_out_prompts(conversations, n: int) -> list[Prompt]:
    """The first turn of the first `n` held-out conversations (the split is seeded, so the same on every run)."""
    return [Prompt(c.turns[0][0], c.system, c.turns[0][1]) for c in conversations[:n] if c.turns and c.turns[0][0]]


def sample_prompts(cfg: Recipe, conversations) -> list[Prompt]:
    if cfg.eval.prompts:
        return [Prompt(p, cfg.data.system_prompt) for p in cfg.eval.prompts]
    return held_out_prompts(conversations, cfg.eval.samples)


def metric_of(cfg: Recipe) -> str | None:
    """The held-out metric this run scores, or None."""
    m = cfg.eval.metric
    if m == "auto":
        return "exact" if cfg.data.path.startswith("synthetic:") else None
    return None if m == "none" else m


def metric_prompts(cfg: Recipe, conversations) -> list[Prompt]:
    """The held-out prompts the metric scores: the first `eval.metric_rows` of the seeded split, with references."""
    if metric_of(cfg) is None:
        return []
    return [p for p in held_out_prompts(conversations, cfg.eval.metric_rows) if p.reference]


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS (what lorafit trains answers to end with) and the model's
    generation-config EOS ids (chat models often end turns with their own token)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return sorted(ids)


def greedy_answers(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    device=None,
    synced_gpus: bool = False,
    autocast_dtype=None,
    progress=None,
) -> list[str]:
    """Answer each tokenized prompt greedily, in left-padded batches; the text up to the first EOS, stripped.
    `progress(n)` is told after each batch how many prompts it answered.

    Restores the model's train/eval mode. Greedy decoding makes the answers (and the metric's score) a function of the
    weights alone, so two runs with equal weights log equal samples.
    """
    import torch
    from transformers import GenerationConfig

    if not prompt_ids:
        return []
    device = device or next(model.parameters()).device
    device = torch.device(device)
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=pad, use_cache=True
    )
    was_training = model.training
    model.eval()  # no LoRA dropout; gradient checkpointing only acts in training mode, so the KV cache is kept
    answers: list[str] = []
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            width = max(len(p) for p in chunk)
            # Left padding: every prompt ends at the same column, so new tokens of all rows start together.
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            with torch.no_grad(), amp:
                out = model.generate(
                    input_ids=ids, attention_mask=mask, generation_config=gen_cfg, synced_gpus=synced_gpus
                )
            for row in out[:, width:].tolist():  # host-device sync
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return answers


def scored(metric: str, answers: list[str], prompts: list[Prompt], regex: str | None = None) -> list[dict]:
    """One record per prompt: prompt, reference, answer, score (what predictions-*.jsonl holds)."""
    return [{"prompt": p.user, "reference": p.reference, "answer": a,
             "score": metrics.score(metric, a, p.reference or "", regex)} for p, a in zip(prompts, answers)]


def sample_markdown(prompt: Prompt, answer: str) -> str:
    """One sample as TensorBoard text (markdown: two trailing spaces keep the answer's line breaks)."""

    def md(text: str) -> str:
        return text.replace("\n", "  \n")

    parts = [f"**prompt:** {md(prompt.user)}", f"**answer:** {md(answer) or '*(empty)*'}"]
    if prompt.reference is not None:
        parts.append(f"**reference:** {md(prompt.reference)}")
    return "\n\n".join(parts)


class EvalCallback(TrainerCallback):
    """Sample answers after each evaluation; the held-out metric at the start and the end of training (and at each
    evaluation when asked)."""

    def __init__(self, cfg: Recipe, layout, renderer, tokenizer, conversations, writer, results: dict | None = None,
                 run_dir: str | Path | None = None):
        self.cfg = cfg.eval
        self.renderer = renderer
        self.tok = tokenizer
        self.writer = writer
        self.is_main = layout.is_main
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # ZeRO-3 and FSDP2: every rank must join every forward (see the module docstring).
        self.all_ranks = layout.kind in ("zero3", "fsdp2") and layout.world_size > 1
        self.samples = sample_prompts(cfg, conversations) if conversations or cfg.eval.prompts else []
        self.metric = metric_of(cfg)
        self.scored = metric_prompts(cfg, conversations)
        # summary.json's evaluation keys; the run session's dict, kept in every checkpoint so a resumed run's summary
        # still has <metric>_before and eval_loss_before
        self.results: dict = {} if results is None else results
        if self.metric and self.scored:
            self.results["metric"] = self.metric

    def _answer(self, args, model, prompts: list[Prompt], max_new_tokens: int) -> list[str] | None:
        if not prompts or not (self.is_main or self.all_ranks):
            return None
        import torch

        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None  # as in training's autocast
        ids = [self.renderer.prompt_ids(p.user, p.system) for p in prompts]
        return greedy_answers(
            model,
            self.tok,
            ids,
            max_new_tokens,
            self.cfg.batch_size,
            device=args.device,
            synced_gpus=self.all_ranks,
            autocast_dtype=dtype,
        )

    def _score(self, args, state, model, when: str) -> None:
        """when: before | after | resumed | step-N (the predictions file's name and the summary key)."""
        answers = self._answer(args, model, self.scored, self.cfg.metric_max_new_tokens)
        if answers is None or not self.is_main:
            return
        rows = scored(self.metric, answers, self.scored, self.cfg.regex)
        value = sum(r["score"] for r in rows) / len(rows)
        if when in ("before", "after"):
            self.results[f"{self.metric}_{when}"] = value
        self.writer.add_scalar(f"eval/{self.metric}", value, state.global_step)
        self.writer.flush()
        if self.run_dir is not None:
            folder = self.run_dir / "eval"
            folder.mkdir(exist_ok=True)
            with open(folder / f"predictions-{when}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps({**r, "step": state.global_step}, ensure_ascii=False) + "\n" for r in rows)
        wrong = next((r for r in rows if not r["score"]), None)
        log.info(
            "%s at step %d: %.3f on %d held-out prompts%s",
            self.metric,
            state.global_step,
            value,
            len(rows),
            f" (e.g. {wrong['prompt'][:80]!r} -> {wrong['answer'][:80]!r})" if wrong else "",
        )

    def on_train_begin(self, args, state, control, model=None, **kw):
        # A resumed run starts past step 0: its score is not the base model's, so it is logged but not `before`.
        self._score(args, state, model, "before" if state.global_step == 0 else "resumed")

    def on_train_end(self, args, state, control, model=None, **kw):
        self._score(args, state, model, "after")

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
        if metrics and "eval_loss" in metrics and state.global_step == 0:
            self.results["eval_loss_before"] = metrics["eval_loss"]
        if self.cfg.metric_at_eval_steps and 0 < state.global_step < state.max_steps:
            self._score(args, state, model, f"step-{state.global_step}")
        answers = self._answer(args, model, self.samples, self.cfg.max_new_tokens)
        if answers is None:
            return
        for i, (p, a) in enumerate(zip(self.samples, answers)):
            self.writer.add_text(f"eval/sample_{i}", sample_markdown(p, a), state.global_step)
        self.writer.flush()
        self.results["samples"] = [
            {"prompt": p.user, "answer": a, "step": state.global_step} for p, a in zip(self.samples, answers)
        ]
        if self.is_main:
            log.info("sample at step %d: %r -> %r", state.global_step, self.samples[0].user[:80], answers[0][:200])

    def summary(self) -> dict:
        """Extra summary.json keys: <metric>_before / _after, eval_loss_before, the last sample answers."""
        return dict(self.results)


def evaluated_at(state, step: int) -> bool:
    """Whether the Trainer already logged an evaluation at `step` (the final evaluate is then not repeated)."""
    return any("eval_loss" in h and h.get("step") == step for h in state.log_history)
