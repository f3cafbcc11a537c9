"""NF4 dequantize alone: bitsandbytes' CUDA kernel against lorafit's Triton kernel (quantization.dequant_kernel), at a
Llama-2-7B's linear sizes, in bf16. Prints microseconds per call and the bytes moved per second (packed input +
absmax read, 16-bit output written).

    . .gpu/env.sh; CUDA_VISIBLE_DEVICES=0 python3 bench/dequant.py --out $OUT/dequant.json
"""

from __future__ import annotations

import argparse
import json

import bitsandbytes.functional as F
import torch

from lorafit import fused


def timed(fn, iters: int) -> float:
    for _ in range(5):
        fn()  # warm-up: Triton compiles on the first call
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()  # host-device sync: the timing events
    return start.elapsed_time(end) * 1e3 / iters  # us per call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--out")
    a = p.parse_args()
    rows = []
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.uint8)
        moved = q.numel() + qs.absmax.numel() * 4 + w.numel() * 2
        row = {"shape": shape, "bytes": moved}
        for name, fn in (("bitsandbytes", lambda q=q, qs=qs: F.dequantize_4bit(q, qs)),
                         ("triton", lambda q=q, qs=qs: fused._triton_dequantize(q, qs))):
            us = timed(fn, a.iters)
            row[name] = {"us": round(us, 2), "tb_per_s": round(moved / us / 1e6, 3)}
        row["identical"] = bool(torch.equal(F.dequantize_4bit(q, qs), fused._triton_dequantize(q, qs)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"device": torch.cuda.get_device_name(), "rows": rows}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
