"""Variants that several recipes share: the seed fine-tune on another family's model (recipes/llama3_8b.py and its
siblings call other_model) and the fast path, applied to any base recipe (recipes/*_fast.py call it)."""

from __future__ import annotations

import dataclasses

from lorafit.recipe.schema import Recipe


def fast_path(base: Recipe, name: str, description: str) -> Recipe:
    """`base` on lorafit's fast path, each lever a field (measured on and off in docs/benchmarks.md): packed rows
    (best fit), PyTorch's varlen flash attention, fused 4-bit LoRA layers, no recompute (the planner's `auto` turns it
    back on where the run would not fit), Liger's kernels, lorafit's sync-free AdamW, two loader workers."""
    r = dataclasses.replace
    return r(
        base,
        name=name,
        description=description,
        model=r(base.model, attn_implementation="varlen"),
        data=r(base.data, packing=True),
        lora=r(base.lora, fused=True),
        training=r(base.training, gradient_checkpointing=False, liger_kernels=True, dataloader_num_workers=2,
                   optimizer="lorafit_adamw_32bit"),
        output=r(base.output, dir=f"runs/{name}"),
    )


def other_model(base: Recipe, name: str, model: str, description: str) -> Recipe:
    """`base` (the seed fine-tune) on another family's instruct model: guanaco's rows are Llama-2 text, parsed into
    turns and rendered with that model's own chat template, answers masked by that template's boundaries
    (lorafit.data.render), the pad token distinct from EOS (lorafit.model)."""
    r = dataclasses.replace
    return r(
        base,
        name=name,
        description=description,
        model=r(base.model, name=model),
        data=r(base.data, chat_template="tokenizer"),
        output=r(base.output, dir=f"runs/{name}"),
    )
