#!/usr/bin/env bash
# Layouts suite: the multi-GPU launch configs on one host, through bench/layouts.py.
#
# What it measures. llama2_guanaco (the seed settings: per-GPU batch 4, gradient checkpointing, padded rows) on the
# Llama-2-7B shape (bench/make_checkpoint.py, random weights) through `accelerate launch --config_file
# launch/<layout>.yaml`: real tokens/s per GPU (median over logged steps after the first two, all ranks' tokens / N)
# and in total, scaling against the one-GPU run, s/step, peak memory and base-parameter memory per GPU (ZeRO-3 shards
# the base). Parts (PARTS picks some):
#   scaling    LAYOUTS_1GPU on 1 GPU, then LAYOUTS on each other count in GPUS, STEPS steps each  -> layouts-scaling/
#   ddp_zero2  DDP against ZeRO-2 on 2 GPUs over LONG_STEPS steps: at 20 steps their difference is inside the padded
#              batches' per-step spread                                                           -> layouts-ddp-zero2/
#   parity     one GPU at batch 4 against DDP on 2 GPUs at batch 2 over the same rows in the same order (8 steps,
#              SGD, dropout 0): per-step losses and grad norms within bf16 tolerances              -> layouts-parity/
# Each folder holds one JSON per run in bench/layouts.py's format (parity.json for the parity check), the launches'
# logs, and table.md (bench/layouts.py --table) for the first two. Runs go one at a time, so every figure has the host
# to itself: runs side by side on one host slow each other.
# Results build up in /tmp/bench-layouts on the box, so a later command on the same warm machine adds to the same
# table, and each command copies the folders as they stand to "${OUT:-/tmp/bench-out}".
#
# Run it on a GPU box with 4 GPUs (with 2, the 4-GPU rows are skipped), from the project root:
#   . .gpu/env.sh; GPUS=1,2 bash bench/suites/layouts.sh                        # ~5 min with the checkpoint
#   . .gpu/env.sh; GPUS=4 bash bench/suites/layouts.sh                          # ~4 min, adds to the same table
#   . .gpu/env.sh; PARTS="ddp_zero2 parity" bash bench/suites/layouts.sh        # ~6 min
# Environment: OUT, MODEL (/tmp/llama2-7b-random, made when missing), PARTS ("scaling"), GPUS ("1,2,4"),
# LAYOUTS ("ddp,zero2,zero3"; zero3_offload also exists, and compiles DeepSpeed's CPU Adam on first use),
# LAYOUTS_1GPU ("single"; ZeRO-2 and ZeRO-3 also run on one GPU), STEPS (20), LONG_STEPS (60).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${GUANACO_1K:?run . .gpu/env.sh first (it sets GUANACO_1K and LLAMA2_TOKENIZER)}"
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
M=${MODEL:-/tmp/llama2-7b-random}
PARTS=${PARTS:-scaling}; GPUS=${GPUS:-1,2,4}
LAYOUTS=${LAYOUTS:-ddp,zero2,zero3}; LAYOUTS_1GPU=${LAYOUTS_1GPU:-single}
STEPS=${STEPS:-20}; LONG_STEPS=${LONG_STEPS:-60}
W=/tmp/bench-layouts
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/layouts.txt"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }
LAY=(python3 bench/layouts.py --model "$M" --data "$GUANACO_1K" --scratch /tmp/bench-layouts-runs)

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/layouts.txt"
[ -f "$M/config.json" ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer "$LLAMA2_TOKENIZER" --out "$M" 2>&1 \
  | tail -1
say "checkpoint ready: $M"
if want scaling; then
  for n in ${GPUS//,/ }; do
    layouts=$LAYOUTS; [ "$n" = 1 ] && layouts=$LAYOUTS_1GPU
    timeout 400 "${LAY[@]}" --out "$W/layouts-scaling" --gpus "$n" --layouts "$layouts" --steps "$STEPS" 2>&1 \
      | grep '^{' | tee -a "$OUT/layouts.txt"
    say "scaling on $n GPU(s) done"
  done
fi
if want ddp_zero2; then
  CUDA_VISIBLE_DEVICES=0,1 timeout 300 "${LAY[@]}" --out "$W/layouts-ddp-zero2" --gpus 2 --layouts ddp,zero2 \
    --steps "$LONG_STEPS" 2>&1 | grep '^{' | tee -a "$OUT/layouts.txt"
  say "ddp against zero2 over $LONG_STEPS steps done"
fi
if want parity; then
  CUDA_VISIBLE_DEVICES=0,1 timeout 240 "${LAY[@]}" --out "$W/layouts-parity" --parity 2>&1 | grep '^{' \
    | tee -a "$OUT/layouts.txt"
  say "parity done"
fi
for d in "$W"/layouts-scaling "$W"/layouts-ddp-zero2; do
  [ -d "$d" ] || continue
  python3 bench/layouts.py --table "$d" > "$d/table.md" 2>&1
  echo "== $(basename "$d")" | tee -a "$OUT/layouts.txt"; tee -a "$OUT/layouts.txt" < "$d/table.md"
done
for d in "$W"/layouts-*; do rm -rf "${OUT:?}/$(basename "$d")"; cp -r "$d" "$OUT/"; done
say "layouts suite done"
