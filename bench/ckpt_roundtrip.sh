#!/usr/bin/env bash
# One checkpoint save/resume round trip of llama2_guanaco on the 7B-shaped checkpoint, on 2 GPUs, for one layout:
# launch 1 trains with a checkpoint at step 4 and gets SIGUSR1 on rank 0 at step 6 (the ranks agree, save
# checkpoint-6, exit 75; accelerate reports 1, status.json keeps 75); launch 2 resumes (--resume auto) to step 8.
# Writes OUT/ckpt_roundtrip_LAYOUT.json: each save's wall time and size, the resume's verification time, statuses,
# exit codes, per-step losses (TensorBoard, no duplicates) and the committed checkpoints' files.
#
#   . .gpu/env.sh; bash bench/ckpt_roundtrip.sh $OUT ddp      # 2 GPUs, ~5 min (two launches of the 7B 4-bit base)
#   . .gpu/env.sh; bash bench/ckpt_roundtrip.sh $OUT zero3    # 2 GPUs, ~6 min
#
# MODEL=/path overrides the base (default: the 7B-shaped random checkpoint, made once by bench/make_checkpoint.py);
# EXTRA_SETS="k=v k=v" adds recipe overrides. CPU dry run of the script itself (tiny model, gloo, ~1 min):
#   ACCELERATE_USE_CPU=1 MODEL=/tmp/tiny GUANACO_1K=../shared/data/guanaco-llama2-1k EXTRA_SETS="quantization.compute_dtype=float32 \
#     training.optimizer=adamw_torch data.max_rows=32 data.max_length=128" bash bench/ckpt_roundtrip.sh /tmp/rt cpu_ddp
set -uo pipefail
OUT=${1:?usage: bench/ckpt_roundtrip.sh OUT_DIR [ddp|zero3]}
LAYOUT=${2:-ddp}
M=${MODEL:-/tmp/llama2-7b-random}
mkdir -p "$OUT"
[ -f "$M/config.json" ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer "$LLAMA2_TOKENIZER" --out "$M" 2>&1 | tail -1
RUN=/tmp/ckpt-roundtrip-$LAYOUT
rm -rf "$RUN"
SETS=(--recipe llama2_guanaco --set "model.name=$M" --set "data.path=$GUANACO_1K" --set "output.dir=$RUN"
      --set training.max_steps=8 --set checkpoint.every_steps=4 --set checkpoint.every_minutes=0
      --set checkpoint.keep_last=0 --set logging.steps=1 --set logging.progress_bar=false)
for kv in ${EXTRA_SETS:-}; do SETS+=(--set "$kv"); done
LAUNCH=(python3 -m accelerate.commands.launch --config_file "launch/$LAYOUT.yaml" --num_processes 2
        ${LORAFIT_BENCH_PORT:+--main_process_port $LORAFIT_BENCH_PORT})

t0=$(date +%s)
LORAFIT_TEST_SIGNAL_AT=0:6 "${LAUNCH[@]}" src/train.py "${SETS[@]}" > "$OUT/ckpt_$LAYOUT.stop.log" 2>&1
RC_STOP=$?
cp "$RUN/status.json" "$OUT/ckpt_${LAYOUT}_status_after_stop.json" 2>/dev/null
t1=$(date +%s)
"${LAUNCH[@]}" src/train.py "${SETS[@]}" > "$OUT/ckpt_$LAYOUT.resume.log" 2>&1
RC_RESUME=$?
t2=$(date +%s)

python3 - "$OUT" "$LAYOUT" "$RUN" "$RC_STOP" "$RC_RESUME" "$((t1 - t0))" "$((t2 - t1))" <<'EOF'
import json, re, sys
from pathlib import Path

out, layout, run, rc_stop, rc_resume, wall_stop, wall_resume = sys.argv[1:]
out, run = Path(out), Path(run)
logs = {k: (out / f"ckpt_{layout}.{k}.log").read_text(errors="replace") for k in ("stop", "resume")}
saves = [{"launch": k, "checkpoint": Path(m[0]).name, "save_s": float(m[1]), "size_mb": float(m[2])}
         for k, text in logs.items()
         for m in re.findall(r"checkpoint (\S+) committed in ([\d.]+) s \(([\d.]+) MB\)", text)]
verify = re.findall(r"resuming from (\S+) \(step (\d+), verified against its manifest in ([\d.]+) s\)", logs["resume"])
losses = None
try:
    from lorafit.tb import read_scalars

    losses = read_scalars(run / "tb")["train/loss"]
except Exception as e:  # report, do not hide, a missing event file
    losses = f"unreadable: {e}"
files = {}
for c in sorted((run / "checkpoints").glob("checkpoint-*")):
    m = c / "manifest.json"
    if m.is_file():
        files[c.name] = {n: f["size"] for n, f in json.loads(m.read_text())["files"].items()}
status = lambda p: json.loads(p.read_text()) if p.is_file() else None
result = {
    "layout": layout, "gpus": 2,
    "launch_exit_codes": {"stop": int(rc_stop), "resume": int(rc_resume)},
    "status_after_stop": status(out / f"ckpt_{layout}_status_after_stop.json"),
    "status_final": status(run / "status.json"),
    "wall_s": {"stop_launch": int(wall_stop), "resume_launch": int(wall_resume)},
    "saves": saves,
    "resume": [{"from": v[0], "step": int(v[1]), "verify_s": float(v[2])} for v in verify],
    "loss_by_step": losses,
    "checkpoint_files_bytes": files,
    # launch 1 ends in torchrun's ChildFailedError traceback by design (a worker exited 75); any other is an error
    "errors": [l for k in logs for l in logs[k].splitlines()
               if "lorafit: error" in l or (k == "resume" and "Traceback" in l)][:5],
}
(out / f"ckpt_roundtrip_{layout}.json").write_text(json.dumps(result, indent=1))
print(json.dumps({k: result[k] for k in ("layout", "launch_exit_codes", "saves", "resume", "errors")}, indent=1))
EOF
