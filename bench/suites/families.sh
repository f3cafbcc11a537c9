#!/usr/bin/env bash
# Families suite: each family's fast recipe against TRL at its strongest (bench/trl_reference.py --tuned --liger
# --optim adamw_torch_fused: bfd packing, flex attention, no recompute, Liger's kernels, fused AdamW), one GPU.
#
# What it measures. For each shape in SHAPES, a random-weight checkpoint of the family's published config
# (bench/make_checkpoint.py; the Llama-2 tokenizer for every shape, so both sides read the same guanaco rows in
# Llama-2 format: data.chat_template=auto), then the two runs in one bench/throughput.py invocation, STEPS steps after
# WARMUP; the checkpoint is deleted after its pair (the disk holds one at a time). Writes families-SHAPE.json (both
# rows: real tokens/s, s/step, peak GiB, MFU on the measured and the datasheet peak) and the tables to families.txt
# under "${OUT:-/tmp/bench-out}".
#
# Run it on the GPU box from the project root, after the bundle's environment (bench/README.md):
#   . .gpu/env.sh; SHAPES="7b llama3-8b" bash bench/suites/families.sh         # ~3.5 min a shape
#   . .gpu/env.sh; bash bench/suites/families.sh                               # 7b llama3-8b qwen2.5-7b mistral-7b
# Environment: OUT, SHAPES, STEPS (30), WARMUP (5), FP8 (modes), PLAIN (1), CUDA_VISIBLE_DEVICES (0).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${GUANACO_1K:?run . .gpu/env.sh first (it sets GUANACO_1K and LLAMA2_TOKENIZER)}"
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
SHAPES=${SHAPES:-7b llama3-8b qwen2.5-7b mistral-7b}; STEPS=${STEPS:-30}; WARMUP=${WARMUP:-5}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
declare -A RECIPE=([7b]=llama2_guanaco_fast [13b]=llama2_guanaco_fast [llama3-8b]=llama3_8b_fast
                   [qwen2.5-7b]=qwen2_5_7b_fast [mistral-7b]=mistral_7b_fast)
# FP8="input_grads all" adds the fast recipe with each quantization.fp8_matmuls mode as a further run; PLAIN=0 leaves
# out the plain fast recipe (when that pair was measured already)
runs() { local r="trl_liger"; [ "${PLAIN:-1}" = 0 ] || r="$r,$1"
         for m in ${FP8:-}; do r="$r,$1+quantization.fp8_matmuls=$m"; done; echo "$r"; }
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/families.txt"; }
say "families suite: SHAPES=\"$SHAPES\" on $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader -i 0)"
for shape in $SHAPES; do
  recipe=${RECIPE[$shape]:?no recipe for shape $shape}
  timeout $(( 300 + 120 * $(echo "${FP8:-}" | wc -w) )) python3 bench/throughput.py --shape "$shape" --data "$GUANACO_1K" --out "/tmp/bench-families/$shape" \
    --steps "$STEPS" --warmup "$WARMUP" --scratch /tmp/bench-families/runs --drop-model \
    --runs "$(runs "lorafit:$recipe+data.chat_template=auto")" 2>&1 | grep -v '^{' | tee -a "$OUT/families.txt"
  cp "/tmp/bench-families/$shape/results.json" "$OUT/families-$shape.json" 2>/dev/null
  rm -rf /tmp/bench-families/runs/shape-"$shape"
  say "$shape done"
done
