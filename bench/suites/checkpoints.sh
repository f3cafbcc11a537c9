#!/usr/bin/env bash
# Checkpoint suite: a checkpoint save/resume round trip on 2 GPUs for each layout, through bench/ckpt_roundtrip.sh.
#
# What it measures. llama2_guanaco on the Llama-2-7B shape (bench/make_checkpoint.py) saves a checkpoint at step 4,
# gets SIGUSR1 on rank 0 at step 6 (the ranks agree, save checkpoint-6 and exit 75), and a second launch resumes
# (--resume auto) to step 8: each save's wall time and size, the resume's verification time, the exit codes and
# statuses, per-step losses and the committed checkpoints' files. Writes checkpoints/ckpt_roundtrip_<layout>.json and
# the launches' logs under "${OUT:-/tmp/bench-out}".
# With 4 GPUs the layouts run side by side (GPUs 0,1 and 2,3, a launch port each); with 2, one after the other.
#
# Run it on a GPU box from the project root:
#   . .gpu/env.sh; bash bench/suites/checkpoints.sh                 # 4 GPUs: ddp and zero3 side by side, ~7 min
#   . .gpu/env.sh; LAYOUTS=ddp bash bench/suites/checkpoints.sh     # 2 GPUs: ~5 min
#   . .gpu/env.sh; LAYOUTS=zero3 bash bench/suites/checkpoints.sh   # 2 GPUs: ~6 min, a command of its own
# Environment: OUT, MODEL (/tmp/llama2-7b-random, made when missing), LAYOUTS ("ddp zero3").
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${GUANACO_1K:?run . .gpu/env.sh first (it sets GUANACO_1K and LLAMA2_TOKENIZER)}"
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT/checkpoints"
export MODEL=${MODEL:-/tmp/llama2-7b-random}
LAYOUTS=${LAYOUTS:-ddp zero3}
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/checkpoints.txt"; }

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/checkpoints.txt"
[ -f "$MODEL/config.json" ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer "$LLAMA2_TOKENIZER" \
  --out "$MODEL" 2>&1 | tail -1
say "checkpoint ready: $MODEL"
gpus=$(nvidia-smi -L | wc -l)
lanes=$(( gpus / 2 )); lane=0
for layout in $LAYOUTS; do
  if [ "$lanes" -ge 2 ]; then  # a lane of 2 GPUs per layout, side by side, each with its own launch port
    [ "$lane" -lt "$lanes" ] || { wait; lane=0; }
    devs="$((2 * lane)),$((2 * lane + 1))"
    ( CUDA_VISIBLE_DEVICES=$devs LORAFIT_BENCH_PORT=$((29621 + lane)) timeout 540 \
        bash bench/ckpt_roundtrip.sh "$OUT/checkpoints" "$layout" > "$OUT/checkpoints/$layout.out" 2>&1
      say "$layout on GPUs $devs: rc=$?" ) &
    lane=$(( lane + 1 ))
  else
    CUDA_VISIBLE_DEVICES=0,1 timeout 540 bash bench/ckpt_roundtrip.sh "$OUT/checkpoints" "$layout" \
      > "$OUT/checkpoints/$layout.out" 2>&1
    say "$layout on GPUs 0,1: rc=$?"
  fi
done
wait
for layout in $LAYOUTS; do tail -n 30 "$OUT/checkpoints/$layout.out" | tee -a "$OUT/checkpoints.txt"; done
say "checkpoints suite done"
