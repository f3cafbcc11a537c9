"""Make a Llama-2-shaped checkpoint with random weights and the real Llama-2 tokenizer, for benchmarks.

    python bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out /tmp/llama2-7b-random
    python bench/make_checkpoint.py --shape 13b --tokenizer ../shared/tokenizers/llama-2 --out /tmp/llama2-13b-random
    python bench/make_checkpoint.py --shape tiny --tokenizer ../shared/tokenizers/llama-2 --out /tmp/tiny   # CPU check

Weights are drawn on the GPU when there is one (normal, std 0.02 like transformers' init; norms at 1) and saved as
bf16 safetensors shards. Throughput and memory of a QLoRA run do not depend on the weight values, only on the shapes.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHAPES = {
    # Llama-2-7B / 13B as published (config.json of meta-llama/Llama-2-{7,13}b-hf)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--tokenizer", required=True, help="folder of the Llama-2 tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
                      torch_dtype="bfloat16", **SHAPES[a.shape])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for prm in model.parameters():
            if prm.ndim == 1:
                prm.fill_(1.0)  # RMSNorm weights
            else:
                prm.normal_(0.0, 0.02)
    model.save_pretrained(a.out, max_shard_size="5GB")
    tok.save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {a.shape} ({n / 1e9:.2f}B parameters) to {a.out} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
