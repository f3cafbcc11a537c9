"""Layouts on several GPUs: llama2_guanaco under each launch config on 1, 2 and 4 GPUs, and a loss-parity check.

    . .gpu/env.sh; python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out /tmp/llama2-7b-random
    . .gpu/env.sh; python3 bench/layouts.py --model /tmp/llama2-7b-random --data $GUANACO_1K --out $OUT/layouts --gpus 1
    . .gpu/env.sh; python3 bench/layouts.py --model /tmp/llama2-7b-random --data $GUANACO_1K --out $OUT/layouts --gpus 2
    . .gpu/env.sh; python3 bench/layouts.py --model /tmp/llama2-7b-random --data $GUANACO_1K --out $OUT/layouts --parity
    . .gpu/env.sh; python3 bench/layouts.py --model /tmp/llama2-7b-random --data $GUANACO_1K --out $OUT/layouts --gpus 4
    python3 bench/layouts.py --table $OUT/layouts            # the table over every JSON in the folder (no GPU needed)

Each run is `accelerate launch --config_file launch/<layout>.yaml --num_processes N src/train.py --recipe
llama2_guanaco` with the model, data and step count set on the command line: the per-GPU batch stays the recipe's 4,
so N GPUs take N x 4 rows per step. When N is every visible GPU, --num_processes is left out, which checks that the
configs default to one process per GPU (the summary's world_size must then be N). One JSON per run,
`<out>/<layout>-<N>gpu.json`: real tokens/s per GPU (the median over logged steps after the first two, all ranks'
non-pad tokens / N), s/step, each rank's peak CUDA memory and parameter bytes (ZeRO-3 shards: ~1/N of one GPU's), the
first losses, and the log's tail when the run failed. `--layouts` picks a subset (zero3_offload is not in the default
set: DeepSpeed compiles its CPU Adam on first use, which needs a compiler on the box).

`--parity`: one GPU at per-device batch 4 against DDP on two GPUs at batch 2, over the same rows in the same order
(dropout off, plain SGD: see tests/test_distributed.py), 8 steps; writes parity.json with per-step losses and grad
norms of both and the verdict against bf16 tolerances.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "single": "single.yaml",
    "ddp": "ddp.yaml",
    "zero2": "zero2.yaml",
    "zero3": "zero3.yaml",
    "zero3_offload": "zero3_offload.yaml",
}
# bf16 on GPU: the two sides pad to different lengths (each rank pads to its own longest row) and multiply matrices
# of different shapes, so cuBLAS may pick other kernels; bf16 keeps 8 bits of mantissa (0.4% relative). Losses of
# ~10 agree to ~1e-3 when everything matches; a run over other rows differs by the batch-to-batch spread (~1e-1).
PARITY_LOSS_ABS, PARITY_GRAD_NORM_REL = 0.02, 0.05


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def launch(config: str, n: int | None, sets: list[str], out_dir: Path, log: Path) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config)]
    if n is not None:
        cmd += ["--num_processes", str(n)]
    if os.environ.get("LORAFIT_BENCH_PORT"):  # several launches side by side on one host need their own ports
        cmd += ["--main_process_port", os.environ["LORAFIT_BENCH_PORT"]]
    cmd += [str(REPO / "src/train.py"), "--recipe", "llama2_guanaco"]
    for s in sets + [f"output.dir={out_dir}", "logging.steps=1", "logging.progress_bar=false"]:
        cmd += ["--set", s]
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    t0 = time.time()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO).returncode
    return rc, round(time.time() - t0, 1)


def wanted(layout: str, n: int) -> bool:
    """single is the 1-GPU baseline; DDP and offload need 2 GPUs or more; ZeRO-2/3 also run on 1 (their own base)."""
    return n == 1 if layout == "single" else n >= 2 if layout in ("ddp", "zero3_offload") else True


def run_layout(a, layout: str, n: int, out: Path) -> dict:
    name = f"{layout}-{n}gpu"
    omit_n = n == visible_gpus() and layout != "single"  # exercise `num_processes: gpu` in the configs
    run_dir = Path(a.scratch) / name
    sets = [f"model.name={a.model}", f"data.path={a.data}", f"training.max_steps={a.steps}"]
    if layout == "zero3_offload":
        sets.append("training.optimizer=adamw_torch")  # ZeRO offload steps the optimizer on the CPU
    rc, wall = launch(LAYOUTS[layout], None if omit_n else n, sets, run_dir, out / f"{name}.log")
    res: dict = {
        "name": name,
        "layout": layout,
        "gpus": n,
        "num_processes_flag": not omit_n,
        "rc": rc,
        "wall_s": wall,
        "steps": a.steps,
    }
    if rc == 0:
        s = json.loads((run_dir / "summary.json").read_text())
        world = s["world_size"]
        tps = s.get("steady_tokens_per_second")
        res.update(
            {
                "world_size": world,
                "effective_batch": s["effective_batch"],
                "real_tokens_per_s": tps,
                "real_tokens_per_s_per_gpu": round(tps / world, 1) if tps else None,
                "real_tokens_per_s_mean": s.get("steady_tokens_per_second_mean"),
                "s_per_step": s.get("steady_step_time_s"),
                "peak_gpu_memory_gib_per_rank": s.get("peak_gpu_memory_gib_per_rank"),
                "param_gib_per_rank": [round(b / 2**30, 3) for b in s.get("param_bytes_per_rank", [])],
                "first_losses": s.get("first_losses"),
                "tokens_per_step": s.get("tokens_per_step"),
            }
        )
        if world != n:
            res["error"] = f"world size {world}, expected {n}"
    else:
        res["log_tail"] = (out / f"{name}.log").read_text()[-3000:]
    (out / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "log_tail"}), flush=True)
    return res


def run_parity(a, out: Path) -> dict:
    from lorafit.tb import read_scalars

    common = [
        f"model.name={a.model}",
        f"data.path={a.data}",
        "training.max_steps=8",
        "lora.dropout=0",
        "training.optimizer=sgd",
        "training.learning_rate=1.0",
        "data.max_length=512",
    ]
    sides = {"one_gpu_batch4": ("single.yaml", 1, 4), "ddp_two_gpus_batch2": ("ddp.yaml", 2, 2)}
    curves, rcs = {}, {}
    for name, (config, n, b) in sides.items():
        run_dir = Path(a.scratch) / f"parity-{name}"
        rcs[name], _ = launch(
            config, n, common + [f"training.per_device_batch_size={b}"], run_dir, out / f"parity-{name}.log"
        )
        if rcs[name] == 0:
            scalars = read_scalars(run_dir / "tb")
            curves[name] = {tag: [v for _, v in scalars[f"train/{tag}"]] for tag in ("loss", "grad_norm")}
    res: dict = {
        "rc": rcs,
        "curves": curves,
        "tolerance": {"loss_abs": PARITY_LOSS_ABS, "grad_norm_rel": PARITY_GRAD_NORM_REL},
    }
    if len(curves) == 2:
        ref, other = curves["one_gpu_batch4"], curves["ddp_two_gpus_batch2"]
        loss_diff = max(abs(x - y) for x, y in zip(ref["loss"], other["loss"]))
        gn_rel = max(abs(x - y) / abs(x) for x, y in zip(ref["grad_norm"], other["grad_norm"]) if x)
        res.update(
            {
                "max_loss_abs_diff": loss_diff,
                "max_grad_norm_rel_diff": gn_rel,
                "pass": loss_diff <= PARITY_LOSS_ABS
                and gn_rel <= PARITY_GRAD_NORM_REL
                and len(ref["loss"]) == len(other["loss"]) == 8,
            }
        )
    (out / "parity.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res), flush=True)
    return res


def table(folder: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*gpu.json"))]
    base = next((r for r in runs if r["name"] == "single-1gpu" and r["rc"] == 0), None)
    rows = [
        "| layout | GPUs | real tokens/s per GPU | total | total, time-weighted mean | scaling vs 1 GPU | s/step | "
        "peak GiB per GPU | params GiB per GPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (list(LAYOUTS).index(r["layout"]), r["gpus"])):
        if r["rc"] != 0 or "error" in r:
            rows.append(f"| {r['layout']} | {r['gpus']} | failed (rc {r['rc']}) {r.get('error', '')} | | | | | | |")
            continue
        scale = (
            f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x"
            if base and base.get("real_tokens_per_s") and r.get("real_tokens_per_s")
            else "-"
        )
        mean = f"{r['real_tokens_per_s_mean']:,.0f}" if r.get("real_tokens_per_s_mean") else "-"
        peak = "/".join(f"{x:.1f}" for x in r.get("peak_gpu_memory_gib_per_rank") or [])
        params = "/".join(f"{x:.2f}" for x in r.get("param_gib_per_rank") or [])
        rows.append(
            f"| {r['layout']} | {r['gpus']} | {r['real_tokens_per_s_per_gpu']:,.0f} | "
            f"{r['real_tokens_per_s']:,.0f} | {mean} | {scale} | {r['s_per_step']:.3f} | {peak} | {params} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (e.g. /tmp/llama2-7b-random)")
    p.add_argument("--data", help="data folder (e.g. $GUANACO_1K)")
    p.add_argument("--out", help="folder for the JSON results and logs")
    p.add_argument("--gpus", default="", help="comma-separated GPU counts to run, e.g. 1,2 or 4")
    p.add_argument("--layouts", default="single,ddp,zero2,zero3", help=f"subset of {','.join(LAYOUTS)}")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    p.add_argument("--parity", action="store_true", help="run the 2-GPU loss-parity check")
    p.add_argument("--scratch", default="/tmp/lorafit-layouts", help="run folders (deleted before each run)")
    p.add_argument("--table", metavar="FOLDER", help="print the markdown table of a results folder and exit")
    a = p.parse_args()
    if a.table:
        print(table(Path(a.table)))
        return
    if not (a.model and a.data and a.out):
        p.error("--model, --data and --out are required")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    have = visible_gpus()
    for n in [int(x) for x in a.gpus.split(",") if x]:
        if n > have:
            print(f"skipping {n} GPUs: {have} visible", flush=True)
            continue
        for layout in a.layouts.split(","):
            if wanted(layout, n):
                run_layout(a, layout, n, out)
    if a.parity:
        run_parity(a, out)
    print(table(out))


if __name__ == "__main__":
    main()
