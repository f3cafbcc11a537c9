"""Where one training step's time goes: lorafit's own pipeline under torch.profiler, for a few steady steps.

    . .gpu/env.sh; CUDA_VISIBLE_DEVICES=0 python3 bench/profile_step.py --recipe llama2_guanaco_fast \\
        --set model.name=/tmp/llama2-7b-random --set data.path=$GUANACO_1K --out $OUT/prof-fast
    python3 bench/profile_step.py --recipe llama2_guanaco --set model.name=/tmp/tiny --set data.path=DATA \\
        --set quantization.compute_dtype=float32 --set training.optimizer=adamw_torch --out /tmp/prof   # CPU dry run

Builds the run exactly as src/train.py does (recipe -> layout -> data/model -> trainer; no checkpoints, no eval,
TensorBoard off), trains `--warmup` steps, then profiles `--steps` steps. Writes into --out:
- `summary.json`: wall time per profiled step; host (CPU) time and device (CUDA) time per step from the profiler;
  the number of kernel launches and of host-device syncs per step; the top ops by self CPU and by self CUDA time;
  the GPU kernels by their own device time per step (60, by name);
- `ops_cpu.txt`, `ops_cuda.txt`: the profiler's tables (self time, 40 rows);
- `trace.json`: a Chrome trace of the profiled steps (chrome://tracing or ui.perfetto.dev);
- `gaps.json`: from that trace, the GPU's idle gaps longer than 0.1 ms, largest first, each with the host ops that were
  running when the kernel that ended it was launched (what the GPU was waiting for), and every sync-like runtime
  call with the host ops around it.

With `--sync-audit` there is no profiler: the steps run under `torch.cuda.set_sync_debug_mode("warn")`, and
`syncs.txt` lists every synchronizing CUDA operation with its Python stack and count per step (the profiler cannot
say which Python line synced; this can, and adds no overhead to the ops that do not sync).

It answers issue 6's open question: at 4 rows per step the 7B step takes 0.365 s whether it holds 1,696 or 4,058
tokens, so is the GPU waiting on the host (device busy time well under wall time), on syncs, or on something else?
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import traceback
import warnings
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


class SyncAudit(TrainerCallback):
    """Steps `first` .. `first + count - 1` (1-based) run under sync debug mode "warn"; each warning's Python stack
    (the frames of the call that synced) is counted."""

    def __init__(self, first: int, count: int):
        self.first, self.count, self.done = first, count, 0
        self.stacks: collections.Counter = collections.Counter()
        self._show = None

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        self.stacks["".join(traceback.format_list(frames[-14:]))] += 1

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == self.first:
            self._show = warnings.showwarning
            warnings.showwarning = self._record
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kw):
        if self._show is None:
            return
        self.done += 1
        if self.done == self.count:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._show
            control.should_training_stop = True

    def report(self) -> str:
        n = max(self.done, 1)
        total = sum(self.stacks.values())
        out = [f"{total / n:.1f} synchronizing CUDA operations per step over {self.done} steps, {len(self.stacks)} "
               "distinct stacks\n"]
        for stack, c in self.stacks.most_common():
            out.append(f"=== {c / n:.1f} per step ===\n{stack}")
        return "\n".join(out)


SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaStreamWaitEvent")


def gaps_from_trace(trace_path: Path, min_us: float = 100.0, top: int = 40) -> dict:
    """The GPU's idle gaps in a torch.profiler Chrome trace, and the host ops that were running when the kernel ending
    each gap was launched; plus every sync-like runtime call with its enclosing host ops."""
    ev = json.loads(Path(trace_path).read_text())["traceEvents"]
    dev = sorted((e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    runtime = {e["args"]["correlation"]: e for e in ev if e.get("cat") == "cuda_runtime" and "args" in e
               and "correlation" in e["args"]}
    ops = collections.defaultdict(list)  # host ops per thread, for the enclosing-op lookup
    for e in ev:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            ops[e["tid"]].append(e)

    def around(tid, ts) -> list[str]:
        inside = [o for o in ops.get(tid, ()) if o["ts"] <= ts <= o["ts"] + o["dur"]]
        return [o["name"][:90] for o in sorted(inside, key=lambda o: (o["ts"], -o["dur"]))][-8:]

    gaps, end, prev = [], None, None
    for k in dev:
        if end is not None and k["ts"] - end > min_us:
            launch = runtime.get(k.get("args", {}).get("correlation"))
            gaps.append({"gap_ms": round((k["ts"] - end) / 1e3, 3), "after_kernel": prev["name"][:80],
                         "next_kernel": k["name"][:80],
                         "next_launched_ms_before_it_ran": None if launch is None else round((k["ts"] - launch["ts"]) / 1e3, 3),
                         "host_ops_at_launch": [] if launch is None else around(launch["tid"], launch["ts"])})
        if end is None or k["ts"] + k["dur"] > end:
            end, prev = k["ts"] + k["dur"], k
    syncs = collections.Counter()
    for e in ev:
        if e.get("cat") == "cuda_runtime" and e.get("name") in SYNC_CALLS:
            syncs[" > ".join([e["name"], *reversed(around(e["tid"], e["ts"]))])] += 1
    return {"idle_ms_total_over_gaps": round(sum(g["gap_ms"] for g in gaps), 2), "gaps": len(gaps),
            "largest": sorted(gaps, key=lambda g: -g["gap_ms"])[:top],
            "sync_calls": syncs.most_common()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--warmup", type=int, default=5, help="steps before the profiled ones (compilation, allocator)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--out", required=True)
    p.add_argument("--sync-audit", action="store_true", help="list the syncs with their Python stacks, no profiler")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    sets = a.overrides + [f"output.dir={out / 'run'}", "logging.tensorboard=false", "logging.progress_bar=false",
                          "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "data.eval_fraction=0",
                          f"training.max_steps={a.warmup + a.steps + 1}"]
    cfg = recipe.load_recipe(a.recipe, sets)
    lay = layout.decide(cfg)
    args_hf = trainer.build_args(cfg, lay, str(out / "run"), has_eval=False)
    from lorafit import data
    from lorafit import source as sources

    source = sources.materialize(cfg.model, True)
    tok = model.load_tokenizer(cfg, source)
    prepared = data.prepare_data(cfg.data, tok, True)
    net = model.load_model(cfg, lay, source, tok)
    if a.sync_audit:
        audit = SyncAudit(a.warmup + 1, a.steps)
        trainer.build_trainer(cfg, lay, args_hf, net, tok, prepared, [audit]).train()
        (out / "syncs.txt").write_text(audit.report())
        print(audit.report()[:4000])
        return
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
    by_name: dict = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:  # each GPU kernel's own time on the device, summed by kernel name
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.time_range.end - e.time_range.start
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
        "kernels_ms_per_step": [(name[:120], c // n, round(us / 1e3 / n, 3))
                                for name, (c, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:60]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "ops_cpu.txt").write_text(ka.table(sort_by="self_cpu_time_total", row_limit=40))
    if cuda:
        (out / "ops_cuda.txt").write_text(ka.table(sort_by="self_cuda_time_total", row_limit=40))
    prof.prof.export_chrome_trace(str(out / "trace.json"))
    if cuda:
        gaps = gaps_from_trace(out / "trace.json")
        (out / "gaps.json").write_text(json.dumps(gaps, indent=1) + "\n")
        summary["idle_ms_per_step_in_gaps"] = round(gaps["idle_ms_total_over_gaps"] / n, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary.get(k) for k in ("device", "wall_s_per_step", "device_busy_s_per_step",
                                                   "kernels_per_step", "sync_like_calls_per_step",
                                                   "idle_ms_per_step_in_gaps")}))


if __name__ == "__main__":
    main()
