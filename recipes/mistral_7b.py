"""The seed fine-tune on Mistral-7B-Instruct-v0.3 (GQA; v0.1 configs add a 4,096-token sliding window): guanaco-llama2-1k rendered in
Mistral's [INST] chat format (the tokenizer's own template), QLoRA NF4, LoRA r=64 on q,v, batch 4, lr 2e-4.

    accelerate launch src/train.py --recipe mistral_7b
    accelerate launch src/train.py --recipe mistral_7b_fast                    # the same on lorafit's fast path
    accelerate launch src/train.py --recipe mistral_7b --set model.name=/models/Mistral-7B-Instruct-v0.3 \
        --set data.path=/data/guanaco-llama2-1k
"""

import dataclasses

from lorafit.recipe import load_recipe


def recipe():
    base = load_recipe("llama2_guanaco")
    r = dataclasses.replace
    return r(
        base,
        name="mistral_7b",
        description="Mistral-7B-Instruct-v0.3 + guanaco-llama2-1k in its own chat format, QLoRA NF4, r=64 on q,v",
        model=r(base.model, name="mistralai/Mistral-7B-Instruct-v0.3"),
        # guanaco's rows are Llama-2 text; parsed into turns and rendered with this model's chat template, answers
        # masked by that template's boundaries (lorafit.data.render), the pad token distinct from EOS (lorafit.model)
        data=r(base.data, chat_template="tokenizer"),
        output=r(base.output, dir="runs/mistral_7b"),
    )
