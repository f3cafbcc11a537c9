"""The seed fine-tune on Llama-3.1-8B-Instruct (GQA, 128k vocabulary): guanaco-llama2-1k rendered in
Llama-3's chat format (the tokenizer's own template), QLoRA NF4, LoRA r=64 on q,v, batch 4, lr 2e-4.

    accelerate launch src/train.py --recipe llama3_8b
    accelerate launch src/train.py --recipe llama3_8b_fast                    # the same on lorafit's fast path
    accelerate launch src/train.py --recipe llama3_8b --set model.name=/models/Llama-3.1-8B-Instruct \
        --set data.path=/data/guanaco-llama2-1k
"""

from lorafit.recipe import load_recipe, other_model


def recipe():
    return other_model(load_recipe("llama2_guanaco"), "llama3_8b", "meta-llama/Llama-3.1-8B-Instruct",
                       "Llama-3.1-8B-Instruct + guanaco-llama2-1k in its own chat format, QLoRA NF4, r=64 on q,v")
