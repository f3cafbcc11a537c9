"""Throughput benchmark: the TRL references and lorafit's recipes, side by side in one invocation on one GPU.

    . .gpu/env.sh; python bench/throughput.py --model /tmp/llama2-7b-random --data $GUANACO_1K --out $OUT/tp \\
        --runs trl_seed,trl_tuned,lorafit:llama2_guanaco,lorafit:llama2_guanaco_fast --steps 40

A run is `trl_seed` / `trl_tuned` (bench/trl_reference.py: plain TRL, no lorafit code) or `lorafit:RECIPE[+k=v...]`
(src/train.py with overrides, e.g. `lorafit:llama2_guanaco_fast+training.liger_kernels=false`). Each runs in its own
process (clean memory counters). Real tokens/s = non-pad tokens per second, median over steps after the warm-up,
with a device sync per step on both sides. Prints a table and writes <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_trl(name: str, a, out: Path) -> dict:
    extra = {"trl_seed": [], "trl_tuned": ["--tuned"], "trl_tuned_all_linear": ["--tuned", "--all-linear",
                                                                                "--dropout", "0"]}[name]
    js = out / f"{name}.json"
    cmd = [sys.executable, str(REPO / "bench/trl_reference.py"), "--model", a.model, "--data", a.data, "--steps",
           str(a.steps), "--warmup", str(a.warmup), "--out", str(js), *extra]
    return _go(name, cmd, out, lambda: json.loads(js.read_text()))


def run_lorafit(spec: str, a, out: Path) -> dict:
    recipe, *sets = spec.split(":", 1)[1].split("+")
    name = spec.replace(":", "_").replace("+", "_").replace("=", "-").replace(".", "-")
    run_dir = Path(a.scratch) / name
    subprocess.run(["rm", "-rf", str(run_dir)])
    overrides = [f"model.name={a.model}", f"data.path={a.data}", f"training.max_steps={a.steps}", "logging.steps=1",
                 "logging.progress_bar=false", f"output.dir={run_dir}", *sets]
    cmd = [sys.executable, str(REPO / "src/train.py"), "--recipe", recipe] + [x for o in overrides for x in ("--set", o)]

    def parse() -> dict:
        s = json.loads((run_dir / "summary.json").read_text())
        return {"name": spec, "real_tokens_per_s": s.get("steady_tokens_per_second"),
                "s_per_step": s.get("steady_step_time_s"), "tokens_per_step": s["tokens_seen"] / max(s["steps"], 1),
                "peak_gib": s.get("peak_gpu_memory_gib"), "mfu": s.get("steady_mfu"), "first_losses": s.get(
                    "first_losses"), "steps": s["steps"]}

    return _go(name, cmd, out, parse)


def _go(name: str, cmd: list[str], out: Path, parse) -> dict:
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    res = {"name": name, "rc": rc}
    if rc == 0:
        try:
            res.update(parse())
        except Exception as e:  # a missing field must not lose the other runs' numbers
            res["parse_error"] = repr(e)
    else:
        res["log_tail"] = (out / f"{name}.log").read_text()[-1500:]
    res["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--runs", default="trl_seed,trl_tuned,lorafit:llama2_guanaco,lorafit:llama2_guanaco_fast")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--scratch", default="/tmp/lorafit-bench")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in a.runs.split(","):
        results.append(run_lorafit(spec, a, out) if spec.startswith("lorafit:") else run_trl(spec, a, out))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'run':60s} {'real tok/s':>10s} {'s/step':>7s} {'tok/step':>8s} {'peak GiB':>8s} {'MFU':>5s}")
    def fmt(r, k, f):
        return f.format(r[k]) if isinstance(r.get(k), int | float) else "-"

    for r in results:
        print(f"{r['name'][:60]:60s} {fmt(r, 'real_tokens_per_s', '{:10.0f}'):>10s} {fmt(r, 's_per_step', '{:7.3f}'):>7s} "
              f"{fmt(r, 'tokens_per_step', '{:8.0f}'):>8s} {fmt(r, 'peak_gib', '{:8.2f}'):>8s} {fmt(r, 'mfu', '{:5.2f}'):>5s}")


if __name__ == "__main__":
    main()
