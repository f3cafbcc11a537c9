"""Make a checkpoint of a family's published shape with random weights and the real Llama-2 tokenizer, for benchmarks.

    python bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out /tmp/llama2-7b-random
    python bench/make_checkpoint.py --shape 13b --tokenizer ../shared/tokenizers/llama-2 --out /tmp/llama2-13b-random
    python bench/make_checkpoint.py --shape llama3-8b --tokenizer $LLAMA2_TOKENIZER --out /tmp/llama3-8b-random
    python bench/make_checkpoint.py --shape tiny --tokenizer ../shared/tokenizers/llama-2 --out /tmp/tiny   # CPU check

Shapes (config.json values as published): 7b, 13b (meta-llama/Llama-2-{7,13}b-hf), llama3-8b (Llama-3.1-8B: GQA 32/8,
MLP 14336, vocabulary 128,256, rope theta 5e5), qwen2.5-7b (Qwen2.5-7B: 28 layers of 3584, GQA 28/4, MLP 18944,
q/k/v biases, vocabulary 152,064), mistral-7b (Mistral-7B-v0.1: GQA 32/8, MLP 14336, a 4,096-token sliding window).
The Llama-2 tokenizer's ids are all below every vocabulary size here, so one tokenizer serves every shape; the LM head
and embeddings have the family's own vocabulary, which is what costs time.
Load that tokenizer from its own folder, not from the checkpoint's (bench/throughput.py --shape passes it to every run
as model.tokenizer / --tokenizer): transformers picks the tokenizer class of a Qwen2 checkpoint by its model type, and
Qwen2Tokenizer reads Llama-2's vocabulary as byte-level BPE (guanaco-llama2-1k becomes 1.54x the tokens, its rows
longer than any real tokenizer makes them).

Weights are drawn on the GPU when there is one (normal, std 0.02 like transformers' init; norms at 1) and saved as
bf16 safetensors shards. Throughput and memory of a QLoRA run do not depend on the weight values, only on the shapes.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {
    # (transformers config class, fields); values from each model's published config.json
    "7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                         rms_norm_eps=1e-5)),
    "13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                          num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                          rms_norm_eps=1e-5)),
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                 use_sliding_window=False)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                   max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5,
                                   sliding_window=4096)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)),
}


def make(shape: str, tokenizer: str, out: str, seed: int = 0) -> str:
    """Write the checkpoint (bf16 safetensors, weights drawn on the GPU when there is one); returns `out`."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    family, fields = SHAPES[shape]
    config_cls, model_cls = classes[family]
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = config_cls(bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
                     torch_dtype="bfloat16", **fields)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.ndim == 1:
                prm.fill_(1.0) if "norm" in name else prm.zero_()  # RMSNorm weights at 1, biases (Qwen2's q/k/v) at 0
            else:
                prm.normal_(0.0, 0.02)
    model.save_pretrained(out, max_shard_size="5GB")
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {shape} ({n / 1e9:.2f}B parameters) to {out} in {time.time() - t0:.1f} s", flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--tokenizer", required=True, help="folder of the Llama-2 tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make(a.shape, a.tokenizer, a.out, a.seed)


if __name__ == "__main__":
    main()
