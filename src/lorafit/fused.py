"""Fused NF4 linears: dequantize, base matmul, LoRA dropout and the LoRA matmuls as one autograd function.

    accelerate launch src/train.py --recipe llama2_guanaco_fast                 # lora.fused=true is the recipe's
    accelerate launch src/train.py --recipe llama2_guanaco_fast --set lora.fused=false        # PEFT's own layers

Why lorafit writes this (PEFT 0.21 and bitsandbytes 0.50 own the layers and stay the owners of the weights, the
adapter files and every path this does not cover): a PEFT LoRA layer over a bitsandbytes 4-bit linear runs the base
matmul through bitsandbytes' autograd function, clones its output ("defensively", peft/tuners/lora/bnb.py), runs
dropout, lora_A and lora_B as three modules, multiplies by the scale and adds. Per layer that is five full passes over
the (tokens x out_features) output beyond the matmuls, their backward twins, and ~15 Python-level modules and
autograd nodes. Here the scale and the add go into the GEMM's epilogue (`out.addmm_(h, B.t(), alpha=scale)`), the
scale of the backward is folded into the skinny (tokens x r) tensor, and the LoRA input gradient is accumulated into
the base's in place. The same arithmetic on the same weights, rounded once instead of three times.

Frozen 4-bit linears (no adapter) get the same function without the LoRA half: dequantize + matmul forward,
dequantize + matmul backward, as bitsandbytes does, with less Python in between.

`quantization.keep_dequantized=true` additionally keeps each layer's 16-bit weight from the forward for the backward,
skipping the second dequantize (2 bytes per base parameter of extra activation memory; lorafit.layout allows it only
without gradient checkpointing and activation offloading, under which the kept weights would be recomputed or copied
to the host).

`quantization.dequant_kernel=triton` dequantizes with lorafit's Triton kernel instead of bitsandbytes'
(`_triton_dequantize`): bitsandbytes' `kDequantizeBlockwise` moved ~2.2 TB/s on an H200 (445 calls, 15.2 ms per
7B step, measured with bench/dequant.py), under half the memory bandwidth, for an elementwise job: two 4-bit codes per
byte looked up in the 16-value NF4 table and scaled by their block's absmax, in float32, rounded once to the output
dtype, the arithmetic of bitsandbytes' kernel (the GPU test compares the two bit for bit).

`quantization.fp8_matmuls=input_grads` runs the base's input-gradient GEMM in FP8 e4m3 instead, `all` the forward
GEMM too, the NF4 weight dequantized straight to FP8 with row-wise scales (lorafit.fp8); the LoRA matmuls stay in
the compute dtype.

The fused function runs only where it computes exactly what PEFT would: training with grad enabled, one active
vanilla LoRA adapter (no DoRA or other variant, no lora bias, not merged, adapters enabled), no extra forward
arguments, and the adapter's dtype equal to the activations' (bf16 after TRL's cast on a GPU) or float32 activations
(a CPU run, whose bf16 adapter is then computed in float32: the same arithmetic, rounded less). Anything else, and
every no-grad call (evaluation, generation: bitsandbytes has fast inference kernels for few tokens), goes to the
library's own forward.
"""

from __future__ import annotations

import functools
import re

from lorafit import fp8


def _dequantize(weight, dtype, kernel: str = "bitsandbytes"):
    import torch

    qs = weight.quant_state
    if kernel == "triton" and weight.is_cuda and _triton_covers(weight, qs):
        w = _triton_dequantize(weight, qs)
    elif not qs.nested and weight.shape[0] != 1:
        # bitsandbytes' own op, called as bitsandbytes.functional.dequantize_4bit calls it for a plain (not double-
        # quantized, not transposed) weight, without that wrapper's per-call validation of a quant state that
        # never changes: 445 calls per step on a 7B, where the host's time per call is what the GPU waits for.
        w = torch.ops.bitsandbytes.dequantize_4bit.default(weight, qs.absmax, qs.blocksize, qs.quant_type, qs.shape,
                                                           qs.dtype)
    else:
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(weight, qs)  # (out, in) in the quant state's dtype
    return w if w.dtype == dtype else w.to(dtype)


def _triton_covers(weight, qs) -> bool:
    import torch

    return (qs.quant_type == "nf4" and not qs.nested and qs.blocksize % 2 == 0 and weight.shape[0] != 1
            and weight.dtype == torch.uint8 and qs.dtype in (torch.bfloat16, torch.float16, torch.float32))


@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize(packed, absmax, table, out, n_bytes, QBLOCK: tl.constexpr, BLOCK: tl.constexpr):
        # BLOCK bytes -> 2 * BLOCK values: the high nibble is the first of each pair, as bitsandbytes packs them
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n_bytes
        b = tl.load(packed + offs, mask=inside, other=0).to(tl.int32)
        scale = tl.load(absmax + (offs * 2) // QBLOCK, mask=inside, other=0.0)  # both nibbles: one block (even)
        hi = tl.load(table + ((b >> 4) & 15)) * scale
        lo = tl.load(table + (b & 15)) * scale
        vals = tl.interleave(hi, lo).to(out.dtype.element_ty, fp_downcast_rounding="rtne")
        o = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out + o, vals, mask=o < 2 * n_bytes)

    return nf4_dequantize


def _triton_dequantize(weight, qs):
    import torch
    import triton

    out = torch.empty(qs.shape, dtype=qs.dtype, device=weight.device)
    n = weight.numel()
    table = qs.code if qs.code.dtype == torch.float32 else qs.code.float()
    block = 1024
    _triton_kernel()[(triton.cdiv(n, block),)](weight, qs.absmax, table, out, n, QBLOCK=qs.blocksize, BLOCK=block)
    return out


def _dropout_grad_add(gx, t, mask, value: float) -> None:
    """gx += t * mask * value in place, bit for bit what gx.addcmul_(t, mask, value=value) computes (float32 math,
    rounded once to gx's dtype, with the multiply-add fused as nvcc compiles addcmul; tests/test_gpu.py compares the
    two). Why lorafit writes it: torch's addcmul takes a bool mask beside bf16 tensors through its unvectorized
    mixed-dtype path (62 calls, 4.8 ms of a 7B step on an H200 in bench/profile_step.py); at a 7B q_proj's gradient
    (4,059 tokens x 4,096) it took 73 us on an H100, this kernel 39 (inside a CUDA graph, 2026-12-07)."""
    import torch

    if not (gx.is_cuda and fp8._has_triton() and mask.dtype == torch.bool and gx.dtype == t.dtype
            and gx.dtype in (torch.bfloat16, torch.float16)  # addcmul orders a float32 self's product otherwise
            and gx.shape == t.shape == mask.shape and gx.is_contiguous() and t.is_contiguous()
            and mask.is_contiguous()):
        gx.addcmul_(t, mask, value=value)
        return
    import triton

    n = gx.numel()
    _dropout_grad_kernel()[(triton.cdiv(n, _DROP_BLOCK),)](gx, t, mask.view(torch.uint8), n, value,
                                                          BLOCK=_DROP_BLOCK, num_warps=4)


_DROP_BLOCK = 2048  # elements per program: 16 per thread of 4 warps (two 16-byte loads of bf16, one of the mask)


@functools.cache
def _dropout_grad_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dropout_grad_add(gx, t, mask, n, value, BLOCK: tl.constexpr):
        # addcmul's arithmetic for a reduced-precision self: a + value * (float(b) * float(c)) in float32 (b * c is
        # exact, c being 0 or 1), the multiply-add one FMA (Triton's default fusion; unfused, 0.08% of a 7B gradient's
        # values differed from addcmul's by one unit in the last place on an H100), rounded to nearest even once
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        a = tl.load(gx + offs, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(t + offs, mask=inside, other=0.0).to(tl.float32)
        c = tl.load(mask + offs, mask=inside, other=0).to(tl.float32)
        tl.store(gx + offs, (a + value * (b * c)).to(gx.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inside)

    return dropout_grad_add


@functools.cache
def _function_class():
    import torch

    class NF4LoRALinear(torch.autograd.Function):
        """y = x W^T (+ bias) + scale * dropout(x) A^T B^T, with W dequantized from NF4 on the fly. A, B None: y = x W^T.

        Saved for the backward: the dropped-out input and h = dropout(x) A^T (what lora_A and lora_B save in PEFT),
        the dropout mask, and the 4-bit weight (a parameter, not a copy), or the 16-bit weight when keep is set.
        """

        @staticmethod
        def forward(ctx, x, lora_a, lora_b, weight, bias, scale: float, p: float, keep: bool,
                    kernel: str = "bitsandbytes", fp8_mode: str = "off"):
            x2 = x.reshape(-1, x.shape[-1])
            w = None
            if fp8_mode == "all":  # the base GEMM in FP8 (lorafit.fp8); the LoRA half below stays in x's dtype
                out = fp8.linear(x2, weight, x.dtype, source=x)
                if bias is not None:
                    out.add_(bias.to(x.dtype))
            else:
                w = _dequantize(weight, x.dtype, kernel)
                out = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(x.dtype), x2, w.t())
            xd = mask = h = a = b = None
            if lora_a is not None:
                a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # no-ops when the dtypes match (a GPU run)
                if p > 0.0:
                    xd, mask = torch.native_dropout(x2, p, True)
                else:
                    xd = x2
                h = torch.mm(xd, a.t())  # (tokens, r)
                out.addmm_(h, b.t(), alpha=scale)  # the scale and the add ride in the GEMM epilogue
            ctx.scale, ctx.p, ctx.weight, ctx.has_bias, ctx.kernel = scale, p, weight, bias is not None, kernel
            ctx.fp8_grads = fp8_mode != "off"
            ctx.adapter_dtype = None if lora_a is None else lora_a.dtype
            ctx.save_for_backward(xd, mask, h, a, b, w if keep else None)
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, g):
            xd, mask, h, a, b, w = ctx.saved_tensors
            g2 = g.reshape(-1, g.shape[-1])
            need_x, need_a, need_b, _, need_bias = ctx.needs_input_grad[:5]
            gx = ga = gb = gbias = None
            if need_x and ctx.fp8_grads:
                gx = fp8.grad_input(g2, ctx.weight, g2.dtype)  # (tokens, in)
            elif need_x:
                w = _dequantize(ctx.weight, g2.dtype, ctx.kernel) if w is None else w
                gx = torch.mm(g2, w)  # (tokens, in)
            if a is not None and (need_x or need_a or need_b):
                s = ctx.scale
                if need_b:
                    gb = torch.mm(g2.t(), h).mul_(s).to(ctx.adapter_dtype)  # (out, r)
                gh = torch.mm(g2, b).mul_(s)  # (tokens, r): the scale folded into the skinny tensor
                if need_a:
                    ga = torch.mm(gh.t(), xd).to(ctx.adapter_dtype)  # (r, in)
                if need_x:
                    if mask is None:
                        gx.addmm_(gh, a)
                    else:  # dropout's backward: the kept entries, scaled by 1 / (1 - p), added in place
                        _dropout_grad_add(gx, torch.mm(gh, a), mask, 1.0 / (1.0 - ctx.p))
            if need_bias and ctx.has_bias:
                gbias = g2.sum(0)
            if gx is not None:
                gx = gx.view(*g.shape[:-1], gx.shape[-1])
            return gx, ga, gb, None, gbias, None, None, None, None, None

    return NF4LoRALinear


@functools.cache
def _classes():
    """Subclasses of PEFT's and bitsandbytes' 4-bit layers whose forward takes the fused path when it applies.
    Built on first use (bitsandbytes and peft import slowly); install() swaps a module's class to one of them, so
    isinstance checks, state dicts, adapter saving and repr are PEFT's and bitsandbytes' own."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    fn = _function_class()

    def plain_4bit(layer, x) -> bool:
        w = layer.weight
        return (getattr(w, "quant_state", None) is not None and not getattr(w.quant_state, "packing_format_for_cpu",
                                                                           False)
                and layer.compute_dtype in (None, x.dtype) and x.dtype in (torch.bfloat16, torch.float16,
                                                                          torch.float32)
                and (not torch.is_autocast_enabled(x.device.type)
                     or torch.get_autocast_dtype(x.device.type) == x.dtype))

    class FusedFrozen4bit(bnb.nn.Linear4bit):
        keep_dequantized = False
        dequant_kernel = "bitsandbytes"
        fp8_matmuls = "off"

        def forward(self, x):
            if not torch.is_grad_enabled():
                return super().forward(x)
            fix_4bit_weight_quant_state_from_module(self)
            if not plain_4bit(self, x) or (self.bias is not None and self.bias.requires_grad):
                return super().forward(x)
            return fn.apply(x, None, None, self.weight, self.bias, 1.0, 0.0, self.keep_dequantized,
                            self.dequant_kernel, self.fp8_matmuls)

    class FusedLoRA4bit(PeftLinear4bit):
        keep_dequantized = False
        dequant_kernel = "bitsandbytes"
        fp8_matmuls = "off"

        def forward(self, x, *args, **kwargs):
            base = self.base_layer
            if args or kwargs or not torch.is_grad_enabled() or self.disable_adapters or self.merged:
                return super().forward(x, *args, **kwargs)
            active = self.active_adapters
            if len(active) != 1 or active[0] not in self.lora_A or active[0] in self.lora_variant:
                return super().forward(x, *args, **kwargs)
            name = active[0]
            a, b = self.lora_A[name], self.lora_B[name]
            fix_4bit_weight_quant_state_from_module(base)
            # PEFT computes the adapter in its own dtype. Equal dtypes (a GPU run: TRL casts adapters to bf16) or
            # float32 activations (CPU runs; the adapter is upcast, which only rounds less) take the fused path.
            if (not plain_4bit(base, x) or a.weight.dtype != b.weight.dtype
                    or (a.weight.dtype != x.dtype and x.dtype != torch.float32) or b.bias is not None or a.bias is not None
                    or (base.bias is not None and base.bias.requires_grad)):
                return super().forward(x, *args, **kwargs)
            drop = self.lora_dropout[name]
            p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
            return fn.apply(x, a.weight, b.weight, base.weight, base.bias, float(self.scaling[name]), p,
                            self.keep_dequantized, self.dequant_kernel, self.fp8_matmuls)

    return FusedFrozen4bit, FusedLoRA4bit


def counts(model) -> dict[str, int]:
    """How many of `model`'s modules install() switched, by kind (summary.json's fused_4bit_layers)."""
    names = {"FusedLoRA4bit": "lora", "FusedFrozen4bit": "frozen"}
    got = {"lora": 0, "frozen": 0}
    for m in model.modules():
        kind = names.get(type(m).__name__)
        if kind and type(m).__module__ == __name__:
            got[kind] += 1
    return got


def install(model, keep_dequantized: bool = False, dequant_kernel: str = "bitsandbytes",
            fp8_matmuls: str = "off", fp8_skip_forward=(), fp8_skip_forward_layers=()) -> dict[str, int]:
    """Switch every 4-bit linear of `model` (a PEFT model) to the fused forward; returns how many of each kind.
    fp8_matmuls: off, input_grads (the base's input-gradient GEMM in FP8) or all (its forward GEMM too), on each
    layer whose weight lorafit.fp8 takes (fp8.mode_for); under all, the linears named in fp8_skip_forward (e.g.
    down_proj) and every linear of the decoder layers in fp8_skip_forward_layers (indices, negative from the end)
    keep their forward in the compute dtype (input_grads)."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    frozen_cls, lora_cls = _classes()
    counts = {"lora": 0, "frozen": 0}
    named = list(model.named_modules())
    skip_layers = _layer_indices(named, fp8_skip_forward_layers) if fp8_matmuls == "all" else set()
    for name, m in named:
        if type(m) in (PeftLinear4bit, lora_cls):  # installing again sets the options
            m.__class__ = lora_cls
            counts["lora"] += 1
            weight = m.base_layer.weight
        elif type(m) in (bnb.nn.Linear4bit, frozen_cls):
            m.__class__ = frozen_cls
            counts["frozen"] += 1
            weight = m.weight
        else:
            continue
        m.keep_dequantized = keep_dequantized
        m.dequant_kernel = dequant_kernel
        mode = fp8.mode_for(fp8_matmuls, weight)
        short = name.removesuffix(".base_layer").rsplit(".", 1)[-1]  # PEFT's wrapped base: its parent's name
        layer = _LAYER.search(name)
        kept = short in fp8_skip_forward or (layer is not None and int(layer.group(1)) in skip_layers)
        m.fp8_matmuls = "input_grads" if mode == "all" and kept else mode
    return counts


_LAYER = re.compile(r"\.layers\.(\d+)\.")  # a decoder layer's index in a module's name (Llama, Qwen2, Mistral)


def _layer_indices(named, wanted) -> set[int]:
    """The decoder-layer indices `wanted` names (negative from the end), as a set of layer numbers."""
    from lorafit.errors import UserError

    found = [int(h.group(1)) for n, _ in named if (h := _LAYER.search(n))]
    count = max(found) + 1 if found else 0
    if wanted and not count:
        raise UserError("quantization.fp8_skip_forward_layers: this model's module names show no decoder layers "
                        "('.layers.N.'); set it to [] and name linears in fp8_skip_forward instead")
    fp8.check_layers(wanted, count)  # lorafit.layout checked them against config.json before the run folder
    return {i % count for i in wanted}
