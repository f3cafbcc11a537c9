"""FP8 (e4m3) matmuls for the frozen NF4 base: the fused layers' base GEMMs at Hopper's FP8 rate, NF4 storage kept.

    accelerate launch src/train.py --recipe llama2_guanaco_fast --set quantization.fp8_matmuls=input_grads
    accelerate launch src/train.py --recipe llama2_guanaco_fast --set quantization.fp8_matmuls=all

Why lorafit writes this: torchao's float8 training converts nn.Linear modules whose weights are 16-bit parameters
(and is not in the stack); a bitsandbytes 4-bit weight is none of those, and no library turns NF4 codes into FP8. The
GEMMs are torch's own (`torch._scaled_mm`, row-wise scales); lorafit supplies the operands.

What it computes, for a base weight W (out x in) stored as NF4 codes c with one absmax a per block of `blocksize`
consecutive values of a row (W[n, k] = c * a, c in NF4's table, which spans [-1, 1]):
- forward y = x W^T: x quantized per token (row) to e4m3 with scale max|x_row| / 448; W straight from its codes to
  e4m3 per output row n with scale s_n = max(a over row n's blocks) / 448, so |c * a / s_n| <= 448, e4m3's largest.
- input gradient dx = g W: g per token as x; W^T (in x out, the layout the GEMM wants) with one scale per column
  block j of W, max(a over the blocks in column block j) / 448, so again nothing exceeds 448.
- LoRA's own matmuls stay in the compute dtype (lorafit.fused); the output is rounded once to it.
Mode `input_grads` runs only the second GEMM in FP8 (each step's loss is computed as without it), `all` both.
e4m3 keeps 3 mantissa bits, a relative rounding of at most 1/16 per operand element (random in sign); the per-row
scales keep one outlier token or row from costing the others their precision. The effect on the loss is measured in
docs/benchmarks.md (bench/loss_parity.py --fp8, SmolLM2-135M, 50 steps): ~0.01% for input_grads; for all,
1.19% with every forward in FP8 and ~0.6% with the first two and last two decoder layers' forwards kept in the
compute dtype (quantization.fp8_skip_forward_layers, lorafit.fused.install), where FP8 costs the loss most.

Every value is computed as (c * a) * (448 / s) in float32 and rounded once to e4m3, on every path: the Triton kernels
on a GPU and the torch reference (a CPU run, and what tests/test_gpu.py checks the kernels against bit for bit). The
weights' reciprocals are taken in torch for both paths; the activations' row scales are divided in the kernel
rounded to nearest, as torch divides one tensor by another.
"""

from __future__ import annotations

import functools

E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) on


def check_device(gpu: int | None, capability: tuple[int, int] | None, notes: list[str]) -> None:
    """Refuse (one line) a GPU without FP8 tensor cores; a CPU run gets a note (torch's reference path, slow)."""
    if gpu is None:
        notes.append("quantization.fp8_matmuls on a CPU: torch's reference path (correct, not fast)")
        return
    if capability is None:
        import torch

        capability = torch.cuda.get_device_capability(gpu)
    if tuple(capability) < MIN_CAPABILITY:
        from lorafit.errors import UserError

        raise UserError(f"quantization.fp8_matmuls needs FP8 tensor cores (compute capability "
                        f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: Ada, Hopper); this GPU is "
                        f"{capability[0]}.{capability[1]}; set quantization.fp8_matmuls=off")


def check_layers(indices, layers: int) -> None:
    """quantization.fp8_skip_forward_layers against a model of `layers` decoder layers (negative from the end)."""
    bad = [i for i in indices if not -layers <= i < layers]
    if bad:
        from lorafit.errors import UserError

        raise UserError(f"quantization.fp8_skip_forward_layers: layer {bad[0]} does not exist, the model has {layers} "
                        f"decoder layers (0..{layers - 1}, or -1..-{layers} from the end); set indices in that range, "
                        "or [] for none")


def mode_for(mode: str, weight) -> str:
    """The FP8 mode of a fused layer, decided once when lorafit.fused installs it (the weight is frozen and already
    placed, so nothing here changes between calls): the recipe's (off | input_grads | all) where this weight allows
    FP8, else off."""
    return mode if mode != "off" and applies(weight) else "off"


def applies(weight) -> bool:
    """Whether this 4-bit weight can take the FP8 path (else the compute-dtype path runs): NF4, whole blocks per row,
    the 16-element alignment FP8 GEMMs need on the two inner dimensions, and a CPU or an FP8 GPU."""
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        return False
    n, k = qs.shape
    if qs.quant_type != "nf4" or k % qs.blocksize or k % 16 or n % 16:
        return False
    if weight.device.type == "cpu":
        return True
    import torch

    return torch.cuda.get_device_capability(weight.device) >= MIN_CAPABILITY


def linear(x2, weight, out_dtype, source=None):
    """x2 (tokens, in) @ W^T in FP8; (tokens, out) in out_dtype. `source`: the tensor x2 was reshaped from, by which
    sibling projections of one input (q, k, v; gate, up) share its quantization (_shared_rowwise)."""
    import torch

    xq, sx = rowwise(x2) if source is None else _shared_rowwise(x2, source)
    wq, sw = weight_e4m3(weight, transpose=False)  # (out, in), scales (1, out)
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype)


def grad_input(g2, weight, out_dtype):
    """g2 (tokens, out) @ W in FP8; (tokens, in) in out_dtype."""
    import torch

    _LAST_INPUT.clear()  # the backward has begun: the forward's last input need not be kept
    gq, sg = rowwise(g2)
    wtq, swt = weight_e4m3(weight, transpose=True)  # (in, out), scales (1, in)
    return torch._scaled_mm(gq, wtq.t(), scale_a=sg, scale_b=swt, out_dtype=out_dtype)


# The last forward input quantized, as [source, its version, (e4m3, scales)]: a decoder layer hands one tensor to q_proj,
# k_proj and v_proj (and one to gate_proj and up_proj), so the second and third calls reuse the first's codes instead
# of reading the activations and launching the kernel again (3 of 7 launches per layer). The source is held (not a
# weak reference) so that `is` cannot match a new tensor at a recycled address; its version counter catches an
# in-place change. Cleared by the first backward GEMM and replaced by the next input: one tensor at most is held.
_LAST_INPUT: list = []


def _shared_rowwise(t, source):
    if _LAST_INPUT and _LAST_INPUT[0] is source and _LAST_INPUT[1] == source._version:
        return _LAST_INPUT[2]
    got = rowwise(t)
    _LAST_INPUT[:] = [source, source._version, got]
    return got


def rowwise(t):
    """t (rows, cols) -> (e4m3 (rows, cols), float32 scales (rows, 1)) with t ~= q * scale, each row's largest
    magnitude at 448. An all-zero row gets scale 1 (its codes are zeros)."""
    import torch

    if t.is_cuda and _has_triton():
        return _triton_rowwise(t)
    amax = t.abs().amax(dim=1, keepdim=True).float()
    amax = torch.where(amax > 0, amax, E4M3_MAX)
    # tensor / tensor: a true division, as the kernel's div_rn (torch turns `x / scalar` into x * (1 / scalar) on
    # CUDA, and `scalar / x` into reciprocal(x) * scalar)
    limit = torch.full_like(amax, E4M3_MAX)
    return (t.float() * (limit / amax)).to(torch.float8_e4m3fn), amax / limit


def weight_e4m3(weight, transpose: bool):
    """A 4-bit weight's values in e4m3: (out, in) with (1, out) scales, or transposed (in, out) with (1, in)."""
    import torch

    inv_rows, scale_rows, inv_cols, scale_cols = _scales(weight)
    qs = weight.quant_state
    if weight.is_cuda and _has_triton():
        return _triton_weight(weight, qs, inv_cols if transpose else inv_rows, transpose), (
            scale_cols if transpose else scale_rows)
    n, k = qs.shape
    vals = nf4_values(weight, qs).view(n, k)  # c * a in float32
    if transpose:
        q = (vals * inv_cols.repeat_interleave(qs.blocksize)[None, :]).t().contiguous()
        return q.to(torch.float8_e4m3fn), scale_cols
    return (vals * inv_rows[:, None]).to(torch.float8_e4m3fn), scale_rows


def nf4_values(weight, qs):
    """The NF4 weight's values c * a in float32, flat, as bitsandbytes' dequantize computes them before rounding to
    its output dtype (the high nibble of each byte is the first of its pair)."""
    import torch

    b = weight.reshape(-1)
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1).long()
    return qs.code.float()[codes] * absmax(qs).repeat_interleave(qs.blocksize)[: codes.numel()]


def absmax(qs):
    """The per-block absmax in float32 (double quantization stores it 8-bit, with its own state and an offset)."""
    if not qs.nested:
        return qs.absmax.float()
    import bitsandbytes.functional as bnbf

    return (bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()


def _scales(weight):
    """(448 / s_row (out,), s_row as (1, out), 448 / s_colblock (in / blocksize,), s_col as (1, in)), computed once per
    weight (the base is frozen) and kept on the parameter."""
    got = getattr(weight, "_lorafit_fp8_scales", None)
    if got is not None and got[0].device == weight.device:
        return got
    import torch

    qs = weight.quant_state
    n, k = qs.shape
    blocks = absmax(qs).view(n, k // qs.blocksize)
    tiny = torch.finfo(torch.float32).tiny
    row_max = blocks.amax(1).clamp_min(tiny)
    col_max = blocks.amax(0).clamp_min(tiny)
    got = (E4M3_MAX / row_max, (row_max / E4M3_MAX)[None, :], E4M3_MAX / col_max,
           (col_max / E4M3_MAX).repeat_interleave(qs.blocksize)[None, :])
    weight._lorafit_fp8_scales = got
    return got


@functools.cache
def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def scale_rows(src, out, scales, cols, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
        # one row per program: its largest magnitude, then out = e4m3(float32(src) * (448 / amax)); the two
        # divisions rounded to nearest (div_rn), as torch divides, so the reference gets the same bits. A row that
        # fits one BLOCK (ONE_PASS) is read once and kept in registers; a longer one is read again from L2.
        row = tl.program_id(0).to(tl.int64)
        if ONE_PASS:
            offs = tl.arange(0, BLOCK)
            v = tl.load(src + row * cols + offs, mask=offs < cols, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(v), axis=0)
        else:
            top = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, cols, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                v = tl.load(src + row * cols + offs, mask=offs < cols, other=0.0).to(tl.float32)
                top = tl.maximum(top, tl.abs(v))
            amax = tl.max(top, axis=0)
        amax = tl.where(amax > 0, amax, 448.0)
        limit = tl.zeros_like(amax) + 448.0
        inv = tl.div_rn(limit, amax)
        tl.store(scales + row, tl.div_rn(amax, limit))
        if ONE_PASS:
            offs = tl.arange(0, BLOCK)
            tl.store(out + row * cols + offs, (v * inv).to(tl.float8e4nv), mask=offs < cols)
        else:
            for start in range(0, cols, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                v = tl.load(src + row * cols + offs, mask=offs < cols, other=0.0).to(tl.float32)
                tl.store(out + row * cols + offs, (v * inv).to(tl.float8e4nv), mask=offs < cols)

    @triton.jit
    def nf4_rows_to_e4m3(packed, absmax, table, inv, out, K, QBLOCK: tl.constexpr, NB: tl.constexpr):
        # W (out, in) in its own layout, NB quantization blocks of one row per program, each block's absmax loaded
        # once as a (NB, 1) column (one load per element was a gather of the same address QBLOCK times), each value
        # times the row's 448 / s_row; the high nibble of each byte first (a flat pass that found each element's
        # row by dividing by K ran at ~1 TB/s on an H100)
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1) * NB + tl.arange(0, NB)  # blocks within the row
        nblk = K // QBLOCK
        inside = blk < nblk
        byte = blk[:, None] * (QBLOCK // 2) + tl.arange(0, QBLOCK // 2)[None, :]  # (NB, QBLOCK / 2)
        b = tl.load(packed + row * (K // 2) + byte, mask=inside[:, None], other=0).to(tl.int32)
        a = tl.load(absmax + row * nblk + blk, mask=inside, other=0.0)[:, None]
        s = tl.load(inv + row)
        hi = ((tl.load(table + (b >> 4)) * a) * s).to(tl.float8e4nv)
        lo = ((tl.load(table + (b & 15)) * a) * s).to(tl.float8e4nv)
        o = blk[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        tl.store(out + row * K + o, tl.interleave(hi, lo), mask=inside[:, None])

    @triton.jit
    def nf4_to_e4m3_t(packed, absmax, table, inv, out, N, K, QBLOCK: tl.constexpr, BN: tl.constexpr,
                      NB: tl.constexpr):
        # W^T (in, out): BN rows x NB quantization blocks of W per program, each (row, block) absmax and each
        # block's 448 / s_col loaded once, each value c * a * (448 / s_col), stored transposed
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        blk = tl.program_id(1) * NB + tl.arange(0, NB)
        nblk = K // QBLOCK
        m = (rows[:, None] < N) & (blk[None, :] < nblk)  # (BN, NB)
        byte = blk[None, :, None] * (QBLOCK // 2) + tl.arange(0, QBLOCK // 2)[None, None, :]  # (1, NB, QBLOCK / 2)
        b = tl.load(packed + rows[:, None, None].to(tl.int64) * (K // 2) + byte, mask=m[:, :, None],
                    other=0).to(tl.int32)
        a = tl.load(absmax + rows[:, None].to(tl.int64) * nblk + blk[None, :], mask=m, other=0.0)[:, :, None]
        s = tl.load(inv + blk, mask=blk < nblk, other=0.0)[None, :, None]
        hi = ((tl.load(table + (b >> 4)) * a) * s).to(tl.float8e4nv)
        lo = ((tl.load(table + (b & 15)) * a) * s).to(tl.float8e4nv)
        v = tl.reshape(tl.interleave(hi, lo), (BN, NB * QBLOCK))
        cols = tl.program_id(1) * (NB * QBLOCK) + tl.arange(0, NB * QBLOCK)
        mm = (rows[:, None] < N) & (cols[None, :] < K)
        tl.store(out + cols[None, :].to(tl.int64) * N + rows[:, None], v, mask=mm)

    return scale_rows, nf4_to_e4m3_t, nf4_rows_to_e4m3


def _triton_rowwise(t):
    import torch
    import triton

    t = t.contiguous()
    out = torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=t.device)
    scales = torch.empty((t.shape[0], 1), dtype=torch.float32, device=t.device)
    cols = t.shape[1]
    if cols <= _ONE_PASS_MAX:  # the row in registers: up to 32 fp32 values a thread
        block = triton.next_power_of_2(cols)
        _kernels()[0][(t.shape[0],)](t, out, scales, cols, BLOCK=block, ONE_PASS=True,
                                     num_warps=max(4, min(32, block // 512)))
    else:
        _kernels()[0][(t.shape[0],)](t, out, scales, cols, BLOCK=2048, ONE_PASS=False, num_warps=8)
    return out, scales


_ONE_PASS_MAX = 32768


def _triton_weight(weight, qs, inv, transpose: bool):
    import torch
    import triton

    n, k = qs.shape
    table = _table(qs)
    out = torch.empty((k, n) if transpose else (n, k), dtype=torch.float8_e4m3fn, device=weight.device)
    absmax_f32 = _absmax_cached(weight, qs)
    nblk = k // qs.blocksize  # whole blocks per row: applies() lets no other weight take the FP8 path
    if not transpose:  # row order: segments of rows (a 2-D tile ran ~3x slower on an H100)
        nb = min(max(1, _ROW_BYTES * 2 // qs.blocksize), triton.next_power_of_2(nblk))
        _kernels()[2][(n, triton.cdiv(nblk, nb))](weight, absmax_f32, table, inv, out, k, QBLOCK=qs.blocksize, NB=nb,
                                                  num_warps=_ROW_WARPS)
        return out
    bn, nb = _T_ROWS, max(1, _T_COLS // qs.blocksize)
    _kernels()[1][(triton.cdiv(n, bn), triton.cdiv(nblk, nb))](weight, absmax_f32, table, inv, out, n, k,
                                                              QBLOCK=qs.blocksize, BN=bn, NB=nb, num_warps=_T_WARPS)
    return out


# Tiles from bench/fp8_sweep.py (one H100, 2026-12-07, kernel time inside a CUDA graph; every choice gave the same
# bytes): row kernel 2,048 values a program on 2 warps, 11.2 / 31.7 / 34.2 us for a 7B's q / up / down_proj against
# 12.7 / 34.3 / 37.5 on 4 warps; transposed 32 x 256 tiles, 14.6 / 38.3 / 37.6 us against 15.2 / 42.0 / 44.0 at 64 x 128
_ROW_BYTES, _ROW_WARPS = 1024, 2  # packed bytes per program of the row kernel (2,048 values), warps per program
_T_ROWS, _T_COLS, _T_WARPS = 32, 256, 4  # the transposed kernel's tile of W (rows x columns), warps per program


def _table(qs):
    import torch

    return qs.code if qs.code.dtype == torch.float32 else qs.code.float()


def _absmax_cached(weight, qs):
    # plain NF4 keeps a float32 absmax already; a double-quantized one is expanded once and kept (N * K / blocksize
    # float32 values, 1/16 of the 4-bit weight's bytes at blocksize 64)
    if not qs.nested:
        return qs.absmax
    got = getattr(weight, "_lorafit_fp8_absmax", None)
    if got is None or got.device != weight.device:
        got = absmax(qs).contiguous()
        weight._lorafit_fp8_absmax = got
    return got
