"""Evaluation beyond the loss: greedy sample answers logged as TensorBoard text, and the synthetic task's skill check.

The eval loss itself is HF Trainer's (`eval_strategy`, `eval_on_start`; TensorBoard tags from `lorafit.tb`). This
module adds what the Trainer has no notion of:

- sample answers: a few fixed prompts (`eval.prompts`, else the first held-out ones) answered greedily after each
  evaluation and written as text `eval/sample_<i>`, so a user watches the answers change;
- the skill check: for `synthetic:<task>` data, exact-match accuracy (`lorafit.data.tasks.exact_match`) on held-out
  prompts before the first step and after the last, as `eval/skill_exact_match` and summary `skill_before` /
  `skill_after`.

Who generates: rank 0 alone, except under ZeRO-3. There every rank holds a shard of each weight and a forward
gathers them with collectives, so a forward on rank 0 alone would hang; every rank then generates the same prompts
with `synced_gpus=True` (a rank whose sequences finished keeps joining the others' forwards) and only rank 0 writes.
Elsewhere the other ranks skip generation and wait for rank 0 at the next collective of the training loop.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from transformers import TrainerCallback

from lorafit.data import tasks
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


def skill_prompts(cfg: Recipe, conversations) -> list[Prompt]:
    """Held-out prompts with exact answers: only `synthetic:<task>` data has them (a real dataset's answers are free
    text, where exact match says nothing)."""
    if not (cfg.eval.skill_check and cfg.data.path.startswith("synthetic:")):
        return []
    return held_out_prompts(conversations, cfg.eval.skill_prompts)


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
) -> list[str]:
    """Answer each tokenized prompt greedily, in left-padded batches; the text up to the first EOS, stripped.

    Restores the model's train/eval mode. Greedy decoding makes the answers (and the skill score) a function of the
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
    finally:
        model.train(was_training)
    return answers


def skill_score(answers: list[str], prompts: list[Prompt]) -> float:
    return tasks.exact_match(answers, [p.reference for p in prompts])


def sample_markdown(prompt: Prompt, answer: str) -> str:
    """One sample as TensorBoard text (markdown: two trailing spaces keep the answer's line breaks)."""

    def md(text: str) -> str:
        return text.replace("\n", "  \n")

    parts = [f"**prompt:** {md(prompt.user)}", f"**answer:** {md(answer) or '*(empty)*'}"]
    if prompt.reference is not None:
        parts.append(f"**reference:** {md(prompt.reference)}")
    return "\n\n".join(parts)


class EvalCallback(TrainerCallback):
    """Sample answers after each evaluation; the skill check at the start and the end of training."""

    def __init__(self, cfg: Recipe, layout, renderer, tokenizer, conversations, writer, results: dict | None = None):
        self.cfg = cfg.eval
        self.renderer = renderer
        self.tok = tokenizer
        self.writer = writer
        self.is_main = layout.is_main
        # ZeRO-3: every rank must join every forward (see the module docstring).
        self.all_ranks = layout.kind == "zero3" and layout.world_size > 1
        self.samples = sample_prompts(cfg, conversations) if conversations or cfg.eval.prompts else []
        self.skill = skill_prompts(cfg, conversations)
        # summary.json's evaluation keys; the run session's dict, kept in every checkpoint so a resumed run's summary
        # still has skill_before and eval_loss_before
        self.results: dict = {} if results is None else results

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

    def _skill(self, args, state, model, key: str) -> None:
        answers = self._answer(args, model, self.skill, self.cfg.skill_max_new_tokens)
        if answers is None:
            return
        score = skill_score(answers, self.skill)
        self.results[key] = score
        self.writer.add_scalar("eval/skill_exact_match", score, state.global_step)
        self.writer.flush()
        if self.is_main:
            wrong = next(
                ((p, a) for p, a in zip(self.skill, answers) if tasks.normalize(a) != tasks.normalize(p.reference)),
                None,
            )
            log.info(
                "skill check at step %d: exact match %.3f on %d held-out prompts%s",
                state.global_step,
                score,
                len(self.skill),
                f" (e.g. {wrong[0].user!r} -> {wrong[1]!r})" if wrong else "",
            )

    def on_train_begin(self, args, state, control, model=None, **kw):
        # A resumed run starts past step 0: its score is not the base model's, so it is logged but not `before`.
        self._skill(args, state, model, "skill_before" if state.global_step == 0 else "skill_resumed")

    def on_train_end(self, args, state, control, model=None, **kw):
        self._skill(args, state, model, "skill_after")

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
        if metrics and "eval_loss" in metrics and state.global_step == 0:
            self.results["eval_loss_before"] = metrics["eval_loss"]
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
        """Extra summary.json keys: skill_before / skill_after, eval_loss_before, the last sample answers."""
        return dict(self.results)


def evaluated_at(state, step: int) -> bool:
    """Whether the Trainer already logged an evaluation at `step` (the final evaluate is then not repeated)."""
    return any("eval_loss" in h and h.get("step") == step for h in state.log_history)
