#!/usr/bin/env bash
# GPU call X (next session's first call; one H100 or H200, ~8 min), issue 6, after the TRL reference's clock was made
# lorafit's (previous step's end to this step's end, commit 4eea097):
#   1. the whole GPU test tier
#   2. q,v side by side, three times interleaved: llama2_guanaco_fast and tuned TRL (TRL's JSON also keeps the old
#      begin-to-end clock as real_tokens_per_s_in_step, to compare with the earlier calls)
#   3. bench/dequant.py: bitsandbytes' NF4 dequantize kernel against lorafit's Triton kernel, alone
#   4. keeps .smolA's half of SmolLM2's GGUF in /tmp/smol for call Y
# run: . .gpu/env.sh; bash bench/gpu_call_x.sh     (carry [".gpu", ".smolA"]; results in $OUT, written as they come)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/x.txt; }
mkdir -p /tmp/smol && cp .smolA/part.00 /tmp/smol/ 2>/dev/null
M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider > $OUT/tests.log 2>&1
say "gpu tier rc=$?"; grep -E "PASSED|FAILED|passed|failed" $OUT/tests.log | tail -14 | tee -a $OUT/x.txt
CUDA_VISIBLE_DEVICES=0 timeout 60 python3 bench/dequant.py --out $OUT/dequant.json 2>&1 | tail -3 | tee -a $OUT/x.txt
timeout 380 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-x --steps 30 --warmup 5 --repeat 3 \
  --scratch /tmp/bench-x --runs "lorafit:llama2_guanaco_fast,trl_tuned" 2>&1 | tee $OUT/qv.jsonl | tail -3 | tee -a $OUT/x.txt
cp /tmp/res-x/results.json $OUT/qv.json 2>/dev/null
say "done"
