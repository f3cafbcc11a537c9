#!/usr/bin/env bash
# FSDP2 smoke on one GPU: llama2_guanaco on the Llama-2-7B shape, 20 steps under launch/fsdp2.yaml with one process
# (each 4-bit linear its own FSDP2 unit, lorafit.shard; the multi-GPU figures belong to bench/suites/layouts.sh).
# Writes fsdp2-smoke.json (summary.json: steps, losses, tokens/s, peak GiB, param bytes) and fsdp2-smoke.log under
# "${OUT:-/tmp/bench-out}".
#   . .gpu/env.sh; bash bench/suites/fsdp2.sh          # ~2 min with the checkpoint made (MODEL, else ~40 s more)
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${GUANACO_1K:?run . .gpu/env.sh first (it sets GUANACO_1K and LLAMA2_TOKENIZER)}"
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
M=${MODEL:-/tmp/llama2-7b-random}
[ -f "$M/config.json" ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer "$LLAMA2_TOKENIZER" --out "$M" 2>&1 \
  | tail -1
rm -rf /tmp/bench-fsdp2
CUDA_VISIBLE_DEVICES=0 timeout 300 accelerate launch --config_file launch/fsdp2.yaml --num_processes 1 src/train.py \
  --recipe llama2_guanaco --set model.name="$M" --set data.path="$GUANACO_1K" --set output.dir=/tmp/bench-fsdp2 \
  --set training.max_steps=20 --set logging.steps=1 --set logging.progress_bar=false > "$OUT/fsdp2-smoke.log" 2>&1
echo "fsdp2 smoke: exit $?"
cp /tmp/bench-fsdp2/summary.json "$OUT/fsdp2-smoke.json" 2>/dev/null
grep -E "lorafit: (layout|FSDP2|done|time)|error" "$OUT/fsdp2-smoke.log" | cut -c1-300
