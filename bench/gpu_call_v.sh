#!/usr/bin/env bash
# GPU call V (2026-12-02; one H200, ~8 min), issue 6, after call U's sync audit found TRL's fused LM head syncing four
# times per step (boolean masks on the device) and transformers' packed-row detection once:
#   1. the GPU tests of the new pieces: the packed step with the indexed LM head under sync debug mode "error", the
#      fused layers (bitsandbytes' dequantize op now called directly), the flat AdamW
#   2. the sync audit again, on llama2_guanaco_fast as it is now (expected: none)
#   3. side by side, twice interleaved: llama2_guanaco_fast; the same with the two new pieces off (call S's code
#      path); tuned TRL
# run: . .gpu/env.sh; bash bench/gpu_call_v.sh     (carry [".gpu"]; results in $OUT, written as they come)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/v.txt; }
M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider \
  -k "indexed or fused or sync_free" > $OUT/tests.log 2>&1
say "gpu tests rc=$?"; grep -E "PASSED|FAILED|Error|passed|failed" $OUT/tests.log | tail -8 | tee -a $OUT/v.txt
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench/profile_step.py --recipe llama2_guanaco_fast --set model.name=$M \
  --set data.path=$GUANACO_1K --sync-audit --out /tmp/audit > $OUT/audit.log 2>&1
say "sync audit rc=$?: $(head -1 /tmp/audit/syncs.txt)"; cp /tmp/audit/syncs.txt $OUT/ 2>/dev/null
timeout 380 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-v --steps 30 --warmup 5 --repeat 2 \
  --scratch /tmp/bench-v --runs "lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+env:LORAFIT_BENCH_OFF=mask_skip/indexed_lm_head,trl_tuned" 2>&1 | tail -4 | tee -a $OUT/v.txt
cp /tmp/res-v/results.json $OUT/qv.json 2>/dev/null
say "done"
