"""The seed fine-tune on Qwen2.5-7B-Instruct (GQA, biases on q/k/v, 152k vocabulary): guanaco-llama2-1k rendered in
Qwen's ChatML chat format (the tokenizer's own template), QLoRA NF4, LoRA r=64 on q,v, batch 4, lr 2e-4.

    accelerate launch src/train.py --recipe qwen2_5_7b
    accelerate launch src/train.py --recipe qwen2_5_7b_fast                    # the same on lorafit's fast path
    accelerate launch src/train.py --recipe qwen2_5_7b --set model.name=/models/Qwen2.5-7B-Instruct \
        --set data.path=/data/guanaco-llama2-1k
"""

from lorafit.recipe import load_recipe, other_model


def recipe():
    return other_model(load_recipe("llama2_guanaco"), "qwen2_5_7b", "Qwen/Qwen2.5-7B-Instruct",
                       "Qwen2.5-7B-Instruct + guanaco-llama2-1k in its own chat format, QLoRA NF4, r=64 on q,v")
