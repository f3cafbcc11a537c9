"""llama2_guanaco_fast in its memory-lean mode: gradient checkpointing on, everything else as the fast path.

    accelerate launch src/train.py --recipe llama2_guanaco_lean

For GPUs with little memory: the forward is recomputed in the backward (6P instead of 4P FLOPs per token), so only
each layer's input is kept; the 7B base in NF4 plus activations for 4 x 1024 packed tokens stays near 5 GiB.
"""

import dataclasses

from lorafit.recipe import load_recipe


def recipe():
    base = load_recipe("llama2_guanaco_fast")
    r = dataclasses.replace
    return r(
        base,
        name="llama2_guanaco_lean",
        description="llama2_guanaco_fast with gradient checkpointing: the memory-lean mode",
        training=r(base.training, gradient_checkpointing=True),
        output=r(base.output, dir="runs/llama2_guanaco_lean"),
    )
