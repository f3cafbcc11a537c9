"""qwen2_5_7b on lorafit's fast path (lorafit.recipe.fast_path: packing, varlen attention, fused 4-bit layers, no
recompute, Liger, sync-free AdamW); measured against TRL with Liger and fused AdamW in docs/benchmarks.md.

    accelerate launch src/train.py --recipe qwen2_5_7b_fast
"""

from lorafit.recipe import fast_path, load_recipe


def recipe():
    return fast_path(load_recipe("qwen2_5_7b"), "qwen2_5_7b_fast", "qwen2_5_7b on the fast path")
