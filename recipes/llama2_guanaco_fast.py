"""llama2_guanaco on lorafit's fast path: same model, data, LoRA (q,v, r=64, dropout 0.1) and optimizer.

    accelerate launch src/train.py --recipe llama2_guanaco_fast

What changes (each lever is a recipe field, measured on and off in docs/benchmarks.md; lorafit.recipe.fast_path):
- data.packing: best-fit packing of rows into max_length sequences, no attention across rows. An optimizer step then
  sees ~4 x 1024 real tokens instead of 4 padded rows; summary.json reports rows and tokens per step.
- model.attn_implementation=varlen: PyTorch's variable-length flash kernel attends each packed row on its own, from
  sequence boundaries the collator computes on the CPU (lorafit.attention; flex_attention is the alternative).
- training.optimizer=lorafit_adamw_32bit: the seed's 32-bit AdamW kernel and state, unpaged, without
  bitsandbytes' host-device sync after every tensor (lorafit.optim).
- lora.fused: each 4-bit linear and its adapter run as one autograd function, with the LoRA scale and add inside
  the GEMM (lorafit.fused).
- training.gradient_checkpointing off: a 7B 4-bit base with batch 4 x 1024 fits in 80 GB without recompute.
- training.liger_kernels: fused RMSNorm / SwiGLU / RoPE.
- training.dataloader_num_workers=2: batches are packed and collated in two worker processes, so the GPU does not wait
  for the host between steps (+9% on an H100; the same batches in the same order).
"""

from lorafit.recipe import fast_path, load_recipe


def recipe():
    return fast_path(load_recipe("llama2_guanaco"), "llama2_guanaco_fast",
                     "llama2_guanaco with packing, varlen flash attention, fused 4-bit LoRA layers, no recompute, "
                     "Liger kernels, sync-free AdamW")
