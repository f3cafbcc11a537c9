"""One fused NF4 LoRA layer, bf16 against FP8 base matmuls (quantization.fp8_matmuls), at Llama-2-7B's linear sizes:
forward + backward time per call, and each FP8 piece alone (NF4 -> e4m3 weight, transposed weight, row-wise scaling
of the activations, the scaled GEMM) against the bf16 pieces (bitsandbytes' dequantize, torch.mm). Microseconds per
call, CUDA events, after warm-up.

    . .gpu/env.sh; CUDA_VISIBLE_DEVICES=0 python3 bench/fp8_linear.py --out $OUT/fp8_linear.json
    git show main:src/lorafit/fp8.py > /tmp/fp8_main.py       # on a branch that changes lorafit.fp8's kernels
    . .gpu/env.sh; CUDA_VISIBLE_DEVICES=0 python3 bench/fp8_linear.py --against /tmp/fp8_main.py --out $OUT/ab.json

`--against FILE` times the NF4 -> e4m3 weight conversions (row order and transposed) of this checkout's lorafit.fp8
beside those of another version of the module (a file), in one process, and says whether the two give the same bytes.
"""

from __future__ import annotations

import argparse
import json

import bitsandbytes.functional as F
import torch
from dequant import timed  # bench/dequant.py: CUDA-event microseconds per call after warm-up

from lorafit import fp8, fused

SIZES = {"q_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}  # (out, in)


def host(fn, iters: int) -> float:
    """Host microseconds per call: the Python and launch time the GPU waits for when the host is the bottleneck
    (no sync inside the loop; the queue is drained first and after)."""
    import time

    fn()
    torch.cuda.synchronize()  # host-device sync: drain the queue before timing the host
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()  # host-device sync: let the queued work finish
    return dt * 1e6 / iters


def layer_step(n_out, n_in, tokens, use_fp8, iters):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_fused import peft_pair

    _, net = peft_pair("cuda", torch.bfloat16, n_in=n_in, n_out=n_out, r=64)
    fused.install(net, fp8_matmuls="all" if use_fp8 else "off")
    x = torch.randn(1, tokens, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, tokens, n_out, device="cuda", dtype=torch.bfloat16)

    def step():
        net(x).backward(g)

    return timed(step, iters)


def pieces(n: int, k: int, tokens: int, iters: int) -> dict:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q.quant_state = qs
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    wb = F.dequantize_4bit(q, qs)
    xq, sx = fp8.rowwise(x)
    wq, sw = fp8.weight_e4m3(q, False)
    row = {
        "bf16_dequantize": timed(lambda: F.dequantize_4bit(q, qs), iters),
        "bf16_mm": timed(lambda: torch.mm(x, wb.t()), iters),
        "fp8_weight": timed(lambda: fp8.weight_e4m3(q, False), iters),
        "fp8_weight_t": timed(lambda: fp8.weight_e4m3(q, True), iters),
        "fp8_rowwise_x": timed(lambda: fp8.rowwise(x), iters),
        "fp8_scaled_mm": timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw,
                                                        out_dtype=torch.bfloat16), iters),
        "layer_fwd_bwd_bf16": layer_step(n, k, tokens, False, iters),
        "layer_fwd_bwd_fp8": layer_step(n, k, tokens, True, iters),
    }
    row["layer_speedup"] = row["layer_fwd_bwd_bf16"] / row["layer_fwd_bwd_fp8"]
    row["host_bf16_dequantize"] = host(lambda: F.dequantize_4bit(q, qs), iters)
    row["host_bf16_mm"] = host(lambda: torch.mm(x, wb.t()), iters)
    row["host_fp8_weight"] = host(lambda: fp8.weight_e4m3(q, False), iters)
    row["host_fp8_rowwise_x"] = host(lambda: fp8.rowwise(x), iters)
    row["host_fp8_scaled_mm"] = host(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw,
                                                              out_dtype=torch.bfloat16), iters)
    return row


def against(path: str, iters: int) -> dict:
    """This checkout's weight conversions against those of the lorafit.fp8 in `path`: microseconds per call and
    whether the bytes are equal, at each size."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fp8_other", path)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    got = {}
    for name, (n, k) in SIZES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        q_other = q.clone()  # each version keeps its scales on its own weight (weight_e4m3 caches them there)
        q.quant_state = q_other.quant_state = qs
        row = {}
        for tag, transpose in (("weight", False), ("weight_t", True)):
            mine, theirs = fp8.weight_e4m3(q, transpose)[0], other.weight_e4m3(q_other, transpose)[0]
            row[f"{tag}_same_bytes"] = bool(torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)))
            row[f"{tag}_this"] = round(timed(lambda t=transpose, w=q: fp8.weight_e4m3(w, t), iters), 2)
            row[f"{tag}_other"] = round(timed(lambda t=transpose, w=q_other: other.weight_e4m3(w, t), iters), 2)
        got[name] = row
        print(name, json.dumps(row), flush=True)
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--against", help="another version of lorafit/fp8.py: time its weight conversions beside these")
    a = p.parse_args()
    if a.against:
        with open(a.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "against": a.against, "us_per_call": against(
                a.against, a.iters)}, fh, indent=1)
        return
    res = {"device": torch.cuda.get_device_name(), "tokens": a.tokens, "us_per_call": {}}
    for name, (n, k) in SIZES.items():
        row = pieces(n, k, a.tokens, a.iters)
        res["us_per_call"][name] = {k2: round(v, 2) for k2, v in row.items()}
        print(name, json.dumps(res["us_per_call"][name]), flush=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
