"""The seed fine-tune: Llama-2-7B-chat on guanaco-llama2-1k with QLoRA, as in the classic Colab notebook.

    accelerate launch src/train.py --recipe llama2_guanaco
    accelerate launch src/train.py --recipe llama2_guanaco --set model.name=/models/llama-2-7b-chat \\
        --set data.path=/data/guanaco-llama2-1k
"""

from lorafit.recipe import (
    DataConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    QuantizationConfig,
    Recipe,
    TrainingConfig,
)


def recipe() -> Recipe:
    return Recipe(
        name="llama2_guanaco",
        description="Llama-2-7B-chat + guanaco-llama2-1k, QLoRA NF4, r=64 alpha=16 dropout=0.1, batch 4, lr 2e-4",
        model=ModelConfig(name="NousResearch/Llama-2-7b-chat-hf"),
        quantization=QuantizationConfig(load_in_4bit=True, quant_type="nf4", double_quant=False,
                                        compute_dtype="bfloat16"),
        lora=LoraConfig(r=64, alpha=16, dropout=0.1, bias="none", target_modules=None),
        data=DataConfig(path="mlabonne/guanaco-llama2-1k", max_length=1024),  # format: auto, from the columns
        training=TrainingConfig(epochs=1, per_device_batch_size=4, gradient_accumulation_steps=1,
                                learning_rate=2e-4, lr_scheduler="cosine", warmup_ratio=0.03, max_grad_norm=0.3,
                                weight_decay=0.001, optimizer="paged_adamw_32bit", gradient_checkpointing=True),
        logging=LoggingConfig(steps=5),
        output=OutputConfig(dir="runs/llama2_guanaco"),
    )
