"""Model: the tokenizer, the 4-bit base (bitsandbytes NF4) on the layout's device, and the LoRA adapters (peft).

Where the base comes from (hub id, folder, package, GGUF) is lorafit.source's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lorafit import attention
from lorafit.errors import UserError
from lorafit.hub import looks_local
from lorafit.layout import Layout
from lorafit.recipe import Recipe

log = logging.getLogger("lorafit")


def load_tokenizer(cfg: Recipe, source: str):
    """The tokenizer, with a pad token distinct from EOS (so EOS is learned, not masked as padding)."""
    from transformers import AutoTokenizer

    tok_src = cfg.model.tokenizer or source
    if cfg.model.tokenizer and looks_local(cfg.model.tokenizer) and not Path(cfg.model.tokenizer).exists():
        raise UserError(f"model.tokenizer={cfg.model.tokenizer} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(tok_src, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise UserError(f"could not load the tokenizer from {tok_src}: {str(e).splitlines()[0]}; "
                        "give a local folder with --set model.tokenizer=PATH") from None
    choose_pad_token(tok, cfg.model.pad_token, model_vocab_size(cfg, source))
    tok.padding_side = "right"
    return tok


def choose_pad_token(tok, wanted: str | None, vocab_size: int | None = None) -> None:
    """Sets tok.pad_token: the recipe's model.pad_token, else the tokenizer's own if it is neither EOS nor outside
    the model's embedding (`vocab_size` rows, when known), else an existing special token (below)."""

    def outside(token_id) -> bool:
        # A tokenizer class can name a pad token the model has no embedding row for (Qwen2's tokenizer adds
        # <|endoftext|> when the files lack it): padding with it fails mid-step with an IndexError in the embedding.
        return vocab_size is not None and token_id is not None and token_id >= vocab_size

    if wanted is not None:
        if wanted not in tok.get_vocab():
            raise UserError(f"model.pad_token={wanted!r} is not in the tokenizer's vocabulary")
        if outside(tok.convert_tokens_to_ids(wanted)):
            raise UserError(f"model.pad_token={wanted!r} has id {tok.convert_tokens_to_ids(wanted)}, outside the "
                            f"model's {vocab_size}-row embedding; pick a token the model knows")
        tok.pad_token = wanted
    elif tok.pad_token is None or tok.pad_token_id == tok.eos_token_id or outside(tok.pad_token_id):
        # Padding with EOS would mask every EOS out of the loss in collators that mask pad ids, and the model would
        # never learn to stop. Prefer an existing special token so the vocabulary does not change: the unknown token
        # (Llama-2, Mistral: <unk>), else one made for padding (Llama-3.1: <|finetune_right_pad_id|>), else any.
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        padding = sorted(str(t) for t in added.values() if getattr(t, "special", False) and "pad" in str(t).lower())
        for cand in (tok.unk_token, *padding, *getattr(tok, "all_special_tokens", [])):
            cand_id = tok.convert_tokens_to_ids(cand) if cand is not None else None
            if cand_id is not None and cand_id not in (tok.eos_token_id, tok.bos_token_id) and not outside(cand_id):
                tok.pad_token = cand
                break
        else:
            raise UserError("the tokenizer has no token to pad with other than EOS/BOS; set model.pad_token to "
                            "a token of its vocabulary")
    if tok.pad_token_id == tok.eos_token_id:
        raise UserError(f"model.pad_token={tok.pad_token!r} equals the EOS token; pick another so EOS is learned")


def model_vocab_size(cfg: Recipe, source: str) -> int | None:
    """The model's embedding rows from its config.json (no weights read), or None where the config cannot be read
    here (from_pretrained then reports the problem)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(config.get_text_config(), "vocab_size", None)


def quantization_config(cfg: Recipe, layout: Layout):
    import torch
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, layout.quant_storage),
    )


def load_model(cfg: Recipe, layout: Layout, source: str, tokenizer):
    """The quantized base, prepared for k-bit training, with LoRA attached; logs trainable / total parameters."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.quantization.compute_dtype)
    if layout.cpu_threads:
        torch.set_num_threads(layout.cpu_threads)
    if layout.device != "cpu":
        torch.backends.cuda.enable_cudnn_sdp(layout.sdpa_cudnn)  # process-wide; the layout says why
    if layout.attn_implementation == attention.ATTN_NAME:
        attention.register_varlen_attention()  # before from_pretrained, which checks the name
    kwargs = dict(
        quantization_config=quantization_config(cfg, layout),
        dtype=dtype,
        attn_implementation=layout.attn_implementation,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if layout.device_map is not None:
        kwargs["device_map"] = layout.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise UserError(f"could not load model '{source}': {str(e).splitlines()[0]}; for offline use give a local "
                        "folder with --set model.name=PATH") from None
    if layout.attn_implementation == attention.ATTN_NAME:
        attention.skip_mask_building(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    for m in model.modules():
        # bitsandbytes (0.50, nn/modules.py Linear4bit.forward) repacks a 4-bit weight for its AVX512-BF16 CPU kernel
        # on the first forward in eval mode without grad (an evaluation, a generated sample) and keeps it packed; that
        # kernel has no autograd, so every later training step gets no gradient through the frozen base weights.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    for prm in model.parameters():
        prm.requires_grad_(False)  # the base is frozen; LoRA adds the only trainable weights
    if cfg.quantization.load_in_4bit and cfg.quantization.compute_dtype == "float16":
        # fp16's 5-bit exponent overflows in norms and logits: PEFT's k-bit preparation keeps them in float32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # With bf16 compute we skip that float32 upcast on purpose: bf16 has float32's exponent range, and a float32
    # embedding/norms/32k-vocab head cost throughput and memory (measured in docs/benchmarks.md).
    if layout.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=layout.gradient_checkpointing_kwargs)
        # checkpointed segments of a frozen base only propagate gradients to LoRA if their input requires grad
        model.enable_input_require_grads()
    lc = cfg.lora
    targets = lc.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
                          target_modules=targets, task_type="CAUSAL_LM")
    from transformers import set_seed

    set_seed(cfg.training.seed)  # LoRA's A matrices are drawn now, before HF Trainer seeds: same seed, same init
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise UserError(f"lora.target_modules={lc.target_modules}: {str(e).splitlines()[0]}") from None
    if layout.fused_4bit:
        from lorafit import fused

        q = cfg.quantization
        n = fused.install(model, keep_dequantized=layout.keep_dequantized, dequant_kernel=layout.dequant_kernel,
                          fp8_matmuls=layout.fp8_matmuls, fp8_skip_forward=q.fp8_skip_forward,
                          fp8_skip_forward_layers=q.fp8_skip_forward_layers)
        kept = [*q.fp8_skip_forward, *(f"layer {i}" for i in q.fp8_skip_forward_layers)]
        log.info("fused 4-bit layers: %d with LoRA, %d frozen%s%s%s", n["lora"], n["frozen"],
                 " (16-bit weights kept for the backward)" if layout.keep_dequantized else "",
                 ", Triton dequantize" if layout.dequant_kernel == "triton" else "",
                 {"off": "", "input_grads": ", base input gradients in FP8",
                  "all": ", base matmuls in FP8" + (f" (forward in 16 bits: {', '.join(kept)})" if kept else "")}[
                     layout.fp8_matmuls])
    if cfg.training.liger_kernels and layout.device != "cpu":
        apply_liger_kernels(model)
    if layout.kind == "fsdp2":
        from lorafit import shard

        n = shard.shard_4bit_linears(model)  # collective: before accelerate wraps the decoder layers around them
        log.info("FSDP2: %d 4-bit linears sharded as bytes, each its own unit", n)
    # No dtype fix-up for ZeRO-3 here: TRL recasts LoRA weights to bf16 when it wraps a quantized model, and
    # DeepSpeed's bf16/fp16 mode then casts every float parameter to the compute dtype (lorafit.layout explains why
    # the 4-bit storage dtype must equal it).
    trainable, total = model.get_nb_trainable_parameters()
    log.info("parameters: %s trainable / %s total (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def apply_liger_kernels(model) -> None:
    """Liger's Triton kernels for RMSNorm, SwiGLU and RoPE, patched into the base model's modules (GPU only).

    What TRL's `use_liger_kernel=True` did through HF Trainer (which TRL now deprecates in favour of hub kernels that
    an offline machine cannot fetch): the same call, with the same configuration TRL forced. Liger's fused linear
    cross-entropy stays off: it replaces the model's forward, and the training loss runs TRL's fused LM head or
    lorafit's indexed one (lorafit.lm_head)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False)
