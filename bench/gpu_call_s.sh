#!/usr/bin/env bash
# GPU call S (next session; one H100 or H200, ~9 min), issue 6, after the flat-group AdamW (commit 6b4c634):
#   1. the GPU tests of the optimizer (flat groups on CUDA, bit-identical to paged AdamW) and of the fused layers
#   2. side by side, twice interleaved: llama2_guanaco_fast with its optimizer and with the seed's paged AdamW, and
#      tuned TRL; then the all-linear recipe (448 LoRA tensors: where one launch per group should matter most) the
#      same way
# run: . .gpu/env.sh; bash bench/gpu_call_s.sh     (carry [".gpu"]; results in $OUT, written as they come)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/s.txt; }
M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider \
  -k "fused or sync_free" > $OUT/tests.log 2>&1
say "gpu tests rc=$?"; grep -E "PASSED|FAILED|passed|failed" $OUT/tests.log | tail -5 | tee -a $OUT/s.txt
timeout 290 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-s/qv --steps 30 --warmup 5 --repeat 2 \
  --scratch /tmp/bench-s --runs "lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+training.optimizer=paged_adamw_32bit,trl_tuned" 2>&1 | tail -4 | tee -a $OUT/s.txt
cp /tmp/res-s/qv/results.json $OUT/qv.json 2>/dev/null
say "q,v table done"
