"""Tile sizes of lorafit.fp8's NF4 -> e4m3 weight kernels, timed as the GPU runs them inside a CUDA graph (no launch
time: a training step with graphs, or a busy queue, sees only this), at Llama-2-7B's linear sizes.

    . .gpu/env.sh; CUDA_VISIBLE_DEVICES=0 python3 bench/fp8_sweep.py --out $OUT/sweep.json

Prints and writes microseconds per call and the HBM bandwidth that implies (packed bytes + absmax read, e4m3
written) for each tile choice, lorafit.fp8's current choice marked (its tiles were picked from this sweep), and
whether each choice wrote the same bytes as the first (a tile size must not change a value). The activations' row-wise
scaling (4,096 tokens) is timed alongside for scale. The scales fed to the kernels are random: any serve for timing.
"""

from __future__ import annotations

import argparse
import functools
import json

import bitsandbytes.functional as F
import torch
import triton

from lorafit import fp8

SIZES = {"q_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}  # (out, in)


def graphed_us(fn, calls: int = 20, replays: int = 10) -> float:
    for _ in range(3):
        fn()  # compile
    torch.cuda.synchronize()  # host-device sync: compilation done before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    end.synchronize()  # host-device sync: the timing events
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def measure(res: list, meta: dict, launch, out, ref, moved: int):
    """Time one tile choice (`launch` writes `out`, moving `moved` bytes), append its row to `res`; returns the bytes
    every later choice of this kernel and weight is compared with (the first choice's)."""
    try:
        us = graphed_us(launch)
    except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result too
        res.append({**meta, "error": str(e)[:200]})
        return ref
    launch()
    ref = out.clone() if ref is None else ref
    same = bool(torch.equal(out.view(torch.uint8), ref.view(torch.uint8)))
    res.append({**meta, "us": round(us, 2), "TBps": round(moved / us / 1e6, 2), "same": same})
    print(res[-1], flush=True)
    return ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    a = p.parse_args()
    rows_k, t_k = fp8._kernels()[2], fp8._kernels()[1]
    res = []
    for name, (n, k) in SIZES.items():
        w = torch.randn((n, k), device="cuda", dtype=torch.bfloat16)
        q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.uint8)
        wt = q.view(-1)
        absm = qs.absmax.float().contiguous()
        table = qs.code.float()
        inv = torch.rand(n, device="cuda") + 1
        invc = torch.rand(k // 64, device="cuda") + 1
        moved = n * k // 2 + absm.numel() * 4 + n * k
        nblk = k // 64
        out = torch.empty((n, k), dtype=torch.float8_e4m3fn, device="cuda")
        ref = None
        for nb in (16, 32, 64):
            for warps in (2, 4, 8):
                nbb = min(nb, triton.next_power_of_2(nblk))
                f = functools.partial(rows_k[(n, triton.cdiv(nblk, nbb))], wt, absm, table, inv, out, k, QBLOCK=64,
                                      NB=nbb, num_warps=warps)
                current = nb == fp8._ROW_BYTES * 2 // 64 and warps == fp8._ROW_WARPS
                meta = {"w": name, "kernel": "rows", "nb": nb, "warps": warps, "current": current}
                ref = measure(res, meta, f, out, ref, moved)
        outt = torch.empty((k, n), dtype=torch.float8_e4m3fn, device="cuda")
        ref = None
        for bn, cols in ((32, 128), (64, 128), (128, 128), (32, 256), (64, 256)):
            nbt = cols // 64
            for warps in (4, 8):
                f = functools.partial(t_k[(triton.cdiv(n, bn), triton.cdiv(nblk, nbt))], wt, absm, table, invc, outt,
                                      n, k, QBLOCK=64, BN=bn, NB=nbt, num_warps=warps)
                current = (bn, cols, warps) == (fp8._T_ROWS, fp8._T_COLS, fp8._T_WARPS)
                meta = {"w": name, "kernel": "t", "bn": bn, "cols": cols, "warps": warps, "current": current}
                ref = measure(res, meta, f, outt, ref, moved)
        # activations: 4,096 tokens of this layer's input, and its gradient's rows
        for cols in sorted({k, n}):
            x = torch.randn((4096, cols), device="cuda", dtype=torch.bfloat16)
            us = graphed_us(lambda x=x: fp8._triton_rowwise(x))
            res.append({"w": name, "kernel": "rowwise", "cols": cols, "us": round(us, 2),
                        "TBps": round(x.numel() * 3 / us / 1e6, 2)})
            print(res[-1], flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
