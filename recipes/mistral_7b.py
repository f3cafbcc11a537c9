"""The seed fine-tune on Mistral-7B-Instruct-v0.3 (GQA; v0.1 configs add a 4,096-token sliding window): guanaco-llama2-1k rendered in
Mistral's [INST] chat format (the tokenizer's own template), QLoRA NF4, LoRA r=64 on q,v, batch 4, lr 2e-4.

    accelerate launch src/train.py --recipe mistral_7b
    accelerate launch src/train.py --recipe mistral_7b_fast                    # the same on lorafit's fast path
    accelerate launch src/train.py --recipe mistral_7b --set model.name=/models/Mistral-7B-Instruct-v0.3 \
        --set data.path=/data/guanaco-llama2-1k
"""

from lorafit.recipe import load_recipe, other_model


def recipe():
    return other_model(load_recipe("llama2_guanaco"), "mistral_7b", "mistralai/Mistral-7B-Instruct-v0.3",
                       "Mistral-7B-Instruct-v0.3 + guanaco-llama2-1k in its own chat format, QLoRA NF4, r=64 on q,v")
