"""llama2_guanaco_fast with LoRA on every linear layer (r=64, dropout 0): issue 6's all-linear variant.

    accelerate launch src/train.py --recipe llama2_guanaco_all_linear
"""

import dataclasses

from lorafit.recipe import load_recipe


def recipe():
    base = load_recipe("llama2_guanaco_fast")
    r = dataclasses.replace
    return r(
        base,
        name="llama2_guanaco_all_linear",
        description="llama2_guanaco_fast with LoRA r=64 on all linear layers, dropout 0",
        lora=r(base.lora, target_modules=["all-linear"], dropout=0.0),
        output=r(base.output, dir="runs/llama2_guanaco_all_linear"),
    )
