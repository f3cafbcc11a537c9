#!/usr/bin/env bash
# GPU test tier: `pytest -m gpu` (tests/test_gpu.py), the tests that need a CUDA GPU.
#
# What it checks. The CLI trains the seed recipe and the fast one (with each optimizer, and with the Triton
# dequantize) in bf16 and logs MFU; the 4-bit model lands on the local GPU; restored paged optimizer state is paged
# again on its parameter's GPU; the varlen flash kernel matches each row attended alone (the 7B's 32 heads of 128 and
# SmolLM2's grouped 9/3 heads of 64); lorafit's AdamW is bit-identical to bitsandbytes' paged AdamW 32-bit; the fused
# 4-bit LoRA layer matches PEFT's at a 7B q_proj's size with dropout 0 and 0.1; a packed step with the indexed LM head
# never syncs and matches TRL's head; lorafit's Triton NF4 dequantize is bitsandbytes' bit for bit. The tier runs on
# GPU 0 alone (lorafit refuses one process that sees several GPUs); with more GPUs visible the re-paging test runs
# again with all of them, so it restores onto a GPU other than the first. Writes gpu-tests.log (pytest -v) under
# "${OUT:-/tmp/bench-out}"; exits with pytest's code.
#
# Run it on the GPU box from the project root:
#   . .gpu/env.sh; bash bench/suites/gpu_tests.sh                          # ~2.5 min on one GPU
#   . .gpu/env.sh; K="fused or sync_free" bash bench/suites/gpu_tests.sh   # a subset (pytest -k)
# Environment: OUT, K (a pytest -k expression; default: every test of the tier).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${GUANACO_1K:?run . .gpu/env.sh first}"
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
SELECT=(); if [ -n "${K:-}" ]; then SELECT=(-k "$K"); fi
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider "${SELECT[@]}" \
  > "$OUT/gpu-tests.log" 2>&1
rc=$?
if [ "$(nvidia-smi -L | wc -l)" -gt 1 ]; then
  echo "== every GPU visible: the re-paging test" >> "$OUT/gpu-tests.log"
  timeout 60 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider -k paged >> "$OUT/gpu-tests.log" 2>&1 \
    || rc=$?
fi
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/gpu-tests.log" | tail -20
exit $rc
