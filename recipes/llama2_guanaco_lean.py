"""llama2_guanaco_fast in its memory-lean mode: gradient checkpointing and activation offloading on, everything else
as the fast path.

    accelerate launch src/train.py --recipe llama2_guanaco_lean
    accelerate launch src/train.py --recipe llama2_guanaco_lean --set training.activation_offloading=false

For GPUs with little memory: the forward is recomputed in the backward (6P instead of 4P FLOPs per token), so only
each layer's input is kept, and those inputs wait in CPU memory (copied on side streams) instead of on the GPU. The
optimizer is the seed's paged AdamW 32-bit: its state can move to CPU memory under pressure.
Measured on one H100 with the 7B shape, 4 x 1024 packed tokens (docs/benchmarks.md, 2026-11-28, same invocation):
4.80 GiB peak at 6,085 real tokens/s with offloading; 5.68 GiB at 7,096 without (the second command).
With varlen attention on one H200 (2026-12-02, docs/benchmarks.md): 4.80 GiB at 10,431 real tokens/s.
"""

import dataclasses

from lorafit.recipe import load_recipe


def recipe():
    base = load_recipe("llama2_guanaco_fast")
    r = dataclasses.replace
    return r(
        base,
        name="llama2_guanaco_lean",
        description="llama2_guanaco_fast with gradient checkpointing and activation offloading: the memory-lean mode",
        training=r(base.training, gradient_checkpointing=True, activation_offloading=True,
                   optimizer="paged_adamw_32bit"),
        output=r(base.output, dir="runs/llama2_guanaco_lean"),
    )
