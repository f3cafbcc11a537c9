"""Throughput benchmark: the TRL references and lorafit's recipes, side by side in one invocation on one GPU.

    . .gpu/env.sh; python bench/throughput.py --model /tmp/llama2-7b-random --data $GUANACO_1K --out $OUT/tp \\
        --runs trl_seed,trl_tuned,lorafit:llama2_guanaco,lorafit:llama2_guanaco_fast --steps 40
    . .gpu/env.sh; python bench/throughput.py --shape llama3-8b --data $GUANACO_1K --out $OUT/llama3 \\
        --runs trl_liger,lorafit:llama3_8b_fast+data.chat_template=auto --steps 30 --drop-model  # vs TRL + Liger

A run is `trl_seed` / `trl_tuned` (bench/trl_reference.py: plain TRL, no lorafit code) or `lorafit:RECIPE[+k=v...]`
(src/train.py with overrides, e.g. `lorafit:llama2_guanaco_fast+training.liger_kernels=false`; an `env:NAME=VALUE`
item sets an environment variable for that run, and `off:PIECES` runs it through bench/without.py with those
sync-free pieces off, e.g. `+off:mask_skip/indexed_lm_head`). Each runs in its own
process (clean memory counters). Real tokens/s = non-pad tokens per second, median over steps after the warm-up,
with a device sync per step on both sides. Prints a table and writes <out>/results.json.

Per-step times jitter by ~10% on an H100 with no pattern shared between runs (docs/benchmarks.md), so a
lever worth a few percent needs repeats: `--repeat 2` runs the whole list twice, interleaved (A B A B), and the
table gives the median over repeats with their spread.
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


def run_trl(name: str, a, out: Path, tag: str = "") -> dict:
    liger = ["--tuned", "--liger", "--optim", "adamw_torch_fused"]  # the strongest TRL setting (issue 22)
    extra = {"trl_seed": [], "trl_tuned": ["--tuned"], "trl_tuned_all_linear": ["--tuned", "--all-linear",
                                                                                "--dropout", "0"],
             "trl_liger": liger, "trl_liger_all_linear": [*liger, "--all-linear", "--dropout", "0"]}[name]
    js = out / f"{name}{tag}.json"
    cmd = [sys.executable, str(REPO / "bench/trl_reference.py"), "--model", a.model, "--data", a.data, "--steps",
           str(a.steps), "--warmup", str(a.warmup), "--out", str(js), *extra,
           *(["--tokenizer", a.tokenizer] if a.shape else [])]
    return _go(name, cmd, out, lambda: json.loads(js.read_text()), tag)


def run_lorafit(spec: str, a, out: Path, tag: str = "") -> dict:
    recipe, *sets = spec.split(":", 1)[1].split("+")
    env = dict(os.environ, **dict(x[4:].split("=", 1) for x in sets if x.startswith("env:")))
    off = [x[4:] for x in sets if x.startswith("off:")]
    sets = [x for x in sets if not x.startswith(("env:", "off:"))]
    name = spec.replace(":", "_").replace("+", "_").replace("=", "-").replace(".", "-").replace("/", "-")
    run_dir = Path(a.scratch) / f"{name}{tag}"
    subprocess.run(["rm", "-rf", str(run_dir)])
    overrides = [f"model.name={a.model}", *([f"model.tokenizer={a.tokenizer}"] if a.shape else []),
                 f"data.path={a.data}", f"training.max_steps={a.steps}", "logging.steps=1",
                 "logging.progress_bar=false", f"output.dir={run_dir}", *sets]
    entry = [str(REPO / "bench/without.py"), "/".join(off)] if off else []
    cmd = [sys.executable, *entry, str(REPO / "src/train.py"), "--recipe", recipe] + [
        x for o in overrides for x in ("--set", o)]

    def parse() -> dict:
        s = json.loads((run_dir / "summary.json").read_text())
        return {"name": spec, "real_tokens_per_s": s.get("steady_tokens_per_second"),
                "s_per_step": s.get("steady_step_time_s"), "tokens_per_step": s["tokens_seen"] / max(s["steps"], 1),
                "real_tokens_per_s_mean": s.get("steady_tokens_per_second_mean"), "phases_s": s.get("phases_s"),
                "peak_gib": s.get("peak_gpu_memory_gib"), "mfu": s.get("steady_mfu"),
                "mfu_datasheet": s.get("steady_mfu_datasheet"), "first_losses": s.get(
                    "first_losses"), "steps": s["steps"], "step_times_s": s.get("logged_step_times_s")}

    return _go(name, cmd, out, parse, tag, env)


def _go(name: str, cmd: list[str], out: Path, parse, tag: str = "", env: dict | None = None) -> dict:
    t0 = time.time()
    log_path = out / f"{name}{tag}.log"
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    res = {"name": name, "rc": rc}
    if rc == 0:
        try:
            res.update(parse())
        except Exception as e:  # a missing field must not lose the other runs' numbers
            res["parse_error"] = repr(e)
    else:
        res["log_tail"] = log_path.read_text()[-1500:]
    res["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (or --shape, which makes one)")
    p.add_argument("--shape", help="a bench/make_checkpoint.py shape (7b, 13b, llama3-8b, qwen2.5-7b, mistral-7b): "
                   "its random-weight checkpoint is made under --scratch if missing")
    p.add_argument("--tokenizer", default=os.environ.get("LLAMA2_TOKENIZER"), help="for --shape (default "
                   "$LLAMA2_TOKENIZER): saved with the checkpoint and loaded from this folder by every run")
    p.add_argument("--drop-model", action="store_true", help="delete the --shape checkpoint afterwards (disk)")
    p.add_argument("--data", required=True)
    p.add_argument("--runs", default="trl_seed,trl_tuned,lorafit:llama2_guanaco,lorafit:llama2_guanaco_fast")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--scratch", default="/tmp/lorafit-bench")
    p.add_argument("--repeat", type=int, default=1, help="run the whole list this many times, interleaved")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.shape:
        sys.path.insert(0, str(REPO / "bench"))
        from make_checkpoint import make

        a.model = str(Path(a.scratch) / f"shape-{a.shape}")
        if not (Path(a.model) / "config.json").is_file():
            make(a.shape, a.tokenizer, a.model)
    if not a.model:
        p.error("give --model or --shape")
    results = []
    for rep in range(a.repeat):
        tag = f"_r{rep + 1}" if a.repeat > 1 else ""
        for spec in a.runs.split(","):
            run = run_lorafit if spec.startswith("lorafit:") else run_trl
            results.append({**run(spec, a, out, tag), "repeat": rep + 1})
            (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    if a.shape and a.drop_model:
        subprocess.run(["rm", "-rf", a.model])


def table(results: list[dict]) -> str:
    """One row per run: the median over its repeats of each figure; `spread` = (max - min) / median of real tokens/s
    over the repeats (empty with one repeat)."""
    import statistics

    def med(rows, k):
        v = [r[k] for r in rows if isinstance(r.get(k), int | float)]
        return statistics.median(v) if v else None

    def fmt(v, f):
        return f.format(v) if v is not None else "-"

    lines = [f"{'run':60s} {'real tok/s':>10s} {'spread':>6s} {'s/step':>7s} {'tok/step':>8s} {'peak GiB':>8s} "
             f"{'MFU':>5s}"]
    for name in dict.fromkeys(r["name"] for r in results):
        rows = [r for r in results if r["name"] == name]
        rates = [r["real_tokens_per_s"] for r in rows if isinstance(r.get("real_tokens_per_s"), int | float)]
        spread = (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else None
        lines.append(f"{name[:60]:60s} {fmt(med(rows, 'real_tokens_per_s'), '{:10.0f}'):>10s} "
                     f"{fmt(spread and 100 * spread, '{:5.1f}%'):>6s} {fmt(med(rows, 's_per_step'), '{:7.3f}'):>7s} "
                     f"{fmt(med(rows, 'tokens_per_step'), '{:8.0f}'):>8s} {fmt(med(rows, 'peak_gib'), '{:8.2f}'):>8s} "
                     f"{fmt(med(rows, 'mfu'), '{:5.2f}'):>5s}")
    return "\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
