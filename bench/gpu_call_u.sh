#!/usr/bin/env bash
# GPU call U (2026-12-02; one H200, ~6 min), issue 6: where the fast step's remaining GPU idle time comes from.
#   1. bench/profile_step.py --sync-audit: every synchronizing CUDA op of 3 steady llama2_guanaco_fast steps, with its
#      Python stack
#   2. bench/profile_step.py: the same steps under torch.profiler, with the GPU's idle gaps and what the host was
#      doing when each ended (gaps.json)
#   3. side by side: llama2_guanaco_fast with fastpath.skip_mask_building (new) and without it
# run: . .gpu/env.sh; bash bench/gpu_call_u.sh     (carry [".gpu"]; results in $OUT, written as they come)
# A record of what ran: the switch it used, LORAFIT_BENCH_TRANSFORMERS_MASK=1, is LORAFIT_BENCH_OFF=mask_skip since.
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/u.txt; }
M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
P="--recipe llama2_guanaco_fast --set model.name=$M --set data.path=$GUANACO_1K"
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 bench/profile_step.py $P --sync-audit --out /tmp/audit > $OUT/audit.log 2>&1
say "sync audit rc=$?"; cp /tmp/audit/syncs.txt $OUT/ 2>/dev/null; head -c 1500 $OUT/syncs.txt
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/profile_step.py $P --out /tmp/prof > $OUT/prof.log 2>&1
say "profile rc=$?"; cp /tmp/prof/summary.json $OUT/prof-summary.json; cp /tmp/prof/gaps.json $OUT/prof-gaps.json
tail -1 $OUT/prof.log | tee -a $OUT/u.txt
timeout 200 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-u --steps 30 --warmup 5 \
  --scratch /tmp/bench-u --runs "lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+env:LORAFIT_BENCH_TRANSFORMERS_MASK=1" 2>&1 | tail -3 | tee -a $OUT/u.txt
cp /tmp/res-u/results.json $OUT/ab.json 2>/dev/null
say "done"
