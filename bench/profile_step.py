"""Where one training step's time goes: lorafit's own pipeline under torch.profiler, for a few steady steps.

    . .gpu/env.sh; CUDA_VISIBLE_DEVICES=0 python3 bench/profile_step.py --recipe llama2_guanaco_fast \\
        --set model.name=/tmp/llama2-7b-random --set data.path=$GUANACO_1K --out $OUT/prof-fast
    python3 bench/profile_step.py --recipe llama2_guanaco --set model.name=/tmp/tiny --set data.path=DATA \\
        --set quantization.compute_dtype=float32 --set training.optimizer=adamw_torch --out /tmp/prof   # CPU dry run

Builds the run exactly as src/train.py does (recipe -> layout -> data/model -> trainer; no checkpoints, no eval,
TensorBoard off), trains `--warmup` steps, then profiles `--steps` steps. Writes into --out:
- `summary.json`: wall time per profiled step; host (CPU) time and device (CUDA) time per step from the profiler;
  the number of kernel launches and of host-device syncs per step; the top ops by self CPU and by self CUDA time;
- `ops_cpu.txt`, `ops_cuda.txt`: the profiler's tables (self time, 40 rows);
- `trace.json`: a Chrome trace of the profiled steps (chrome://tracing or ui.perfetto.dev).

It answers issue 6's open question: at 4 rows per step the 7B step takes 0.365 s whether it holds 1,696 or 4,058
tokens, so is the GPU waiting on the host (device busy time well under wall time), on syncs, or on something else?
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from lorafit import layout, model, recipe, trainer


class ProfileSteps(TrainerCallback):
    """Starts torch.profiler at the beginning of step `first` (1-based) and stops it after `count` steps."""

    def __init__(self, first: int, count: int):
        self.first, self.count, self.prof, self.step_walls = first, count, None, []
        self._t = None

    def on_step_begin(self, args, state, control, **kw):
        step = state.global_step + 1
        if step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=False, with_stack=False)
            self.prof.__enter__()
        if self.prof is not None and self.first <= step < self.first + self.count:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # host-device sync, so each step's wall time holds its own GPU work
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self._t is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # host-device sync (see on_step_begin)
        self.step_walls.append(time.perf_counter() - self._t)
        self._t = None
        if len(self.step_walls) == self.count:
            self.prof.__exit__(None, None, None)
            control.should_training_stop = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--warmup", type=int, default=5, help="steps before the profiled ones (compilation, allocator)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    sets = a.overrides + [f"output.dir={out / 'run'}", "logging.tensorboard=false", "logging.progress_bar=false",
                          "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "data.eval_fraction=0",
                          f"training.max_steps={a.warmup + a.steps + 1}"]
    cfg = recipe.load_recipe(a.recipe, sets)
    lay = layout.decide(cfg)
    args_hf = trainer.build_args(cfg, lay, str(out / "run"), has_eval=False)
    source = model.materialize(cfg.model, True)
    tok = model.load_tokenizer(cfg, source)
    from lorafit import data

    prepared = data.prepare(cfg.data, tok)
    net = model.load_model(cfg, lay, source, tok)
    prof = ProfileSteps(a.warmup + 1, a.steps)
    sft = trainer.build_trainer(cfg, lay, args_hf, net, tok, prepared, [prof])
    sft.train()
    if prof.prof is None or len(prof.step_walls) < a.steps:
        raise SystemExit(f"only {len(prof.step_walls)} of {a.steps} steps were profiled (too few rows or steps?)")

    ka = prof.prof.key_averages()
    n = a.steps
    cuda = torch.cuda.is_available()

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))

    # Device time from the GPU's own events (kernels, copies, memsets) on their timeline: summing key_averages'
    # self device time would count each kernel twice (under its launching op and as itself).
    kernels = [e for e in prof.prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, cur = 0.0, None
    for start, end in spans:  # union of intervals: overlapping events (several streams) count once
        if cur is None or start > cur[1]:
            busy += 0.0 if cur is None else cur[1] - cur[0]
            cur = [start, end]
        else:
            cur[1] = max(cur[1], end)
    busy += 0.0 if cur is None else cur[1] - cur[0]
    syncs = sum(e.count for e in ka if e.key in ("cudaDeviceSynchronize", "cudaStreamSynchronize",
                                                   "cudaEventSynchronize", "aten::item", "aten::_local_scalar_dense"))
    summary = {
        "recipe": cfg.name,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "profiled_steps": n,
        "wall_s_per_step": [round(x, 4) for x in prof.step_walls],
        "device_busy_s_per_step": round(busy / 1e6 / n, 4) if cuda else None,
        "kernels_per_step": round(len(kernels) / n, 1) if cuda else None,
        "sync_like_calls_per_step": round(syncs / n, 1),
        "top_self_cpu": [(e.key, e.count // n, round(e.self_cpu_time_total / 1e3 / n, 2))
                         for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]],
        "top_self_device": [(e.key, e.count // n, round(device_us(e) / 1e3 / n, 2))
                            for e in sorted(ka, key=lambda e: -device_us(e))[:25]] if cuda else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "ops_cpu.txt").write_text(ka.table(sort_by="self_cpu_time_total", row_limit=40))
    if cuda:
        (out / "ops_cuda.txt").write_text(ka.table(sort_by="self_cuda_time_total", row_limit=40))
    prof.prof.export_chrome_trace(str(out / "trace.json"))
    print(json.dumps({k: summary[k] for k in ("device", "wall_s_per_step", "device_busy_s_per_step",
                                               "kernels_per_step", "sync_like_calls_per_step")}))


if __name__ == "__main__":
    main()
