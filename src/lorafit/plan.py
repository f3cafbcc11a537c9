"""The memory planner: peak GPU memory per process, estimated from the model's config.json before anything loads.

    python src/train.py --recipe llama2_guanaco_fast --plan     # estimate + the settings it would choose

Used by `training.gradient_checkpointing=auto`: checkpointing stays off when the estimate without it fits in 90% of
the smallest visible GPU (faster: 4P instead of 6P FLOPs per token), and turns on when it does not.

Per process, in bytes:
- base: NF4 linear weights at 0.5 B/param + one float32 absmax per 64 weights (double quant: 8 bits + a float32
  per 256 blocks) + the other parameters (embeddings, head, norms) in the compute dtype; divided by the world size
  under ZeRO-3 and FSDP2, which shard them.
- LoRA: r*(in+out) per adapted linear, float32 weight + gradient + two AdamW moments = 16 B/param.
- activations: tokens per micro-step x layers x the bytes one layer keeps per token. With lorafit's fused 4-bit
  layers (lora.fused) and Liger: 19 x hidden + 4.2 x intermediate, fitted on one H100 (2026-12-06, each family's
  fast recipe, 4 x 1024 packed tokens: Llama-2-7B 19.16 GiB, Llama-3-8B 22.46, Qwen2.5-7B 21.13, Mistral-7B
  20.99; the fit's least squares are 18.6 and 4.09, within 0.05% of each; rounded up). Otherwise (PEFT's layers,
  or no Liger) c x hidden, calibrated on an H100 before the fused layers (2026-11-27: llama2_guanaco_fast, 7B,
  peak 26.9 GiB with Liger, 32.3 GiB without): c = 44 B with Liger, 54 B without. With checkpointing only each
  layer's input is kept (2 B)
  plus one layer being recomputed. With activation offloading what is kept goes to CPU memory: one layer's
  activations stay, plus two layer inputs in flight on the copy streams (2026-11-28, llama2_guanaco_lean on the 7B
  shape: 5.68 GiB without offloading, 4.80 GiB with it).
- kept weights (`quantization.keep_dequantized`, no checkpointing): every 4-bit linear's 16-bit weight, 2 B/param.
The numbers are estimates (allocator fragmentation and library workspaces vary by ~10%); --plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
ACT_BYTES_NO_GC = {True: 44.0, False: 54.0}  # per token x layer x hidden, keyed by Liger on/off (see docstring)
ACT_BYTES_FUSED = (19.0, 4.2)  # per token x layer: x hidden + x intermediate, fused layers with Liger (docstring)
FIT_FRACTION = 0.9


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int

    @classmethod
    def from_config(cls, c) -> Shape:
        heads = c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, heads,
                   getattr(c, "num_key_value_heads", None) or heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer, by the names PEFT targets."""
        h, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                "down_proj": (self.intermediate, h)}


@dataclass
class Estimate:
    base_gib: float
    lora_gib: float
    activations_gib: float
    gradient_checkpointing: bool
    tokens_per_micro_step: int

    @property
    def total_gib(self) -> float:
        return self.base_gib + self.lora_gib + self.activations_gib


def estimate(shape: Shape, *, lora_r: int, targets: list[str] | None, tokens_per_micro_step: int, gc: bool,
             liger: bool, world: int = 1, zero3: bool = False, double_quant: bool = False,
             load_in_4bit: bool = True, dtype_bytes: int = 2, offload: bool = False,
             keep_dequantized: bool = False, fused: bool = False, graphs: bool = False) -> Estimate:
    lin = shape.linear_shapes()
    linear_params = shape.layers * sum(i * o for i, o in lin.values())
    other_params = 2 * shape.vocab * shape.hidden + shape.layers * 2 * shape.hidden + shape.hidden
    if load_in_4bit:
        absmax = (1.0 + 4.0 / 256) / 64 if double_quant else 4.0 / 64
        base = linear_params * (0.5 + absmax) + other_params * dtype_bytes
    else:
        base = (linear_params + other_params) * dtype_bytes
    if zero3:
        base /= world
    lora = lora_parameters(shape, lora_r, targets) * 16.0
    if fused and liger and load_in_4bit:
        per_layer_token = ACT_BYTES_FUSED[0] * shape.hidden + ACT_BYTES_FUSED[1] * shape.intermediate
    else:
        per_layer_token = shape.hidden * ACT_BYTES_NO_GC[liger]
    if offload:
        act = tokens_per_micro_step * (2 * shape.hidden * 2.0 + per_layer_token)
    elif gc:
        act = tokens_per_micro_step * (shape.layers * shape.hidden * 2.0 + per_layer_token)
    else:
        act = tokens_per_micro_step * shape.layers * per_layer_token
        if keep_dequantized and load_in_4bit:
            act += linear_params * dtype_bytes / (world if zero3 else 1)
        if graphs:  # each layer's graph copies its input into a buffer of its own (lorafit.graphs): the 7B fast
            # recipe with FP8 peaked 0.70 GiB higher with them (one H100, 2026-12-06); this term says 1.0
            act += tokens_per_micro_step * shape.layers * shape.hidden * dtype_bytes
    return Estimate(base / GIB, lora / GIB, act / GIB, gc, tokens_per_micro_step)


def for_recipe(cfg, shape: Shape, world: int = 1, zero3: bool = False, gc: bool | None = None) -> Estimate:
    t = cfg.training
    gc = bool(t.gradient_checkpointing) if gc is None else gc
    return estimate(
        shape, lora_r=cfg.lora.r, targets=cfg.lora.target_modules,
        tokens_per_micro_step=t.per_device_batch_size * cfg.data.max_length,  # the worst case: full rows
        gc=gc, liger=t.liger_kernels, world=world,
        zero3=zero3, double_quant=cfg.quantization.double_quant, load_in_4bit=cfg.quantization.load_in_4bit,
        dtype_bytes=4 if cfg.quantization.compute_dtype == "float32" else 2, offload=t.activation_offloading,
        keep_dequantized=cfg.quantization.keep_dequantized and cfg.lora.fused,
        fused=cfg.lora.fused and not zero3,  # ZeRO-3 and FSDP2 run PEFT's layers (lorafit.layout)
        graphs=t.cuda_graphs is not False and world == 1 and not gc)  # where lorafit.layout allows them


def lora_parameters(shape: Shape, r: int, targets) -> int:
    lin = shape.linear_shapes()
    names = list(lin) if targets in (["all-linear"], "all-linear") else (targets or ["q_proj", "v_proj"])
    return shape.layers * sum(r * (lin[n][0] + lin[n][1]) for n in names if n in lin)


TOKENIZER_BYTES = 16 * 2**20  # a checkpoint's tokenizer files: Llama-2 ~2 MB, Llama-3 and Qwen2.5 ~10 MB


def checkpoint_bytes(cfg, shape: Shape, world: int = 1) -> int:
    """Disk a checkpoint takes: the adapter (float32 at most, 4 B/param), AdamW's two float32 moments (8 B/param,
    sharded or not, the same in all), the tokenizer's files, and 1 MiB of scheduler, RNG and state files per rank."""
    n = lora_parameters(shape, cfg.lora.r, cfg.lora.target_modules)
    return int(n * 12 + TOKENIZER_BYTES + world * 2**20)


def choose_checkpointing(cfg, shape: Shape, gpu_gib: float | None, world: int = 1, zero3: bool = False) -> bool:
    """For gradient_checkpointing=auto: off when the model fits without it, else on. No GPU: off (we do not plan
    for CPU RAM; the CPU recipes are small)."""
    if gpu_gib is None:
        return False
    return for_recipe(cfg, shape, world, zero3, gc=False).total_gib > FIT_FRACTION * gpu_gib


def shape_of(model_cfg) -> Shape:
    """The model's shape from its config alone (no weights are read)."""
    from transformers import AutoConfig

    from lorafit.errors import UserError
    from lorafit.source import resolve_source

    src = resolve_source(model_cfg)
    kw = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {}
    try:
        return Shape.from_config(AutoConfig.from_pretrained(src, revision=model_cfg.revision, **kw))
    except OSError as e:  # offline without the hub cache, a wrong id, no access: the user's to fix
        why = str(e).splitlines()[0].rstrip(".")
        raise UserError(f"could not read the config of model '{src}': {why}; for offline use give a local folder "
                        "with --set model.name=PATH") from None


def smallest_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) / GIB


def describe(cfg, shape: Shape, gpu_gib: float | None, layout) -> str:
    """--plan's text for `cfg` under `layout` (lorafit.layout.decide's result for this launch)."""
    world, zero3 = layout.world_size, layout.kind in ("zero3", "fsdp2")  # the base sharded 1/N
    rows = []
    for gc in (False, True):
        e = for_recipe(cfg, shape, world, zero3, gc=gc)
        rows.append(f"  checkpointing {'on ' if gc else 'off'}: base {e.base_gib:5.2f} + LoRA/optimizer "
                    f"{e.lora_gib:5.2f} + activations {e.activations_gib:6.2f} = {e.total_gib:6.2f} GiB per GPU")
    gpu = f"{gpu_gib:.1f} GiB" if gpu_gib else "no GPU visible"
    want = cfg.training.gradient_checkpointing
    chosen = choose_checkpointing(cfg, shape, gpu_gib, world, zero3) if want == "auto" else bool(want)
    micro = cfg.training.per_device_batch_size * cfg.data.max_length
    return "\n".join([
        f"plan for {cfg.name}: {shape.layers} layers x {shape.hidden} hidden, vocab {shape.vocab}; "
        f"{world} process(es){f' ({layout.kind} shards the base)' if zero3 else ''}; smallest GPU {gpu}",
        f"  micro-step: {cfg.training.per_device_batch_size} rows x {cfg.data.max_length} tokens = {micro} tokens "
        f"at most; packing {'on' if cfg.data.packing else 'off'}; Liger {'on' if cfg.training.liger_kernels else 'off'}",
        *rows,
        f"  chosen: gradient checkpointing {'on' if chosen else 'off'}"
        f"{' (auto)' if want == 'auto' else ''}; estimates are +-10% (allocator and library workspaces vary)",
        f"  4-bit layers: {_fused_line(cfg, layout)}",
    ])


def _fused_line(cfg, layout) -> str:
    """What the layout decided for the 4-bit layers."""
    if not cfg.quantization.load_in_4bit:
        return "none (quantization.load_in_4bit=false)"
    if layout.fused_4bit:
        keep = ", 16-bit weights kept for the backward (counted above)" if layout.keep_dequantized else ""
        return "fused with their adapters (lora.fused)" + keep
    if cfg.lora.fused:  # the layout turned it off
        kind = {"zero3": "ZeRO-3", "fsdp2": "FSDP2"}.get(layout.kind, layout.kind)
        return f"PEFT's and bitsandbytes' (lora.fused is off under {kind})"
    return "PEFT's and bitsandbytes' (lora.fused=false)"
