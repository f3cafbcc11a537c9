#!/usr/bin/env bash
# GPU call AA (after calls X-Z on the same warm machine, ~3 min), issue 6: the memory-lean recipe and one epoch of
# llama2_guanaco_fast through accelerate launch, so that every goal has a figure from the same day as the q,v pair.
# run: . .gpu/env.sh; bash bench/gpu_call_aa.sh     (carry [".gpu"]; needs call X's /tmp/llama2-7b-random)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/aa.txt; }
M=/tmp/llama2-7b-random
timeout 120 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-aa/lean --steps 30 --warmup 5 \
  --scratch /tmp/bench-aa --runs "lorafit:llama2_guanaco_lean" 2>&1 | tail -2 | tee -a $OUT/aa.txt
cp /tmp/res-aa/lean/results.json $OUT/lean.json 2>/dev/null
t0=$(date +%s.%N)
timeout 110 accelerate launch --config_file launch/single_gpu.yaml src/train.py --recipe llama2_guanaco_fast \
  --set model.name=$M --set data.path=$GUANACO_1K --set output.dir=/tmp/epoch-aa --set logging.progress_bar=false \
  > $OUT/epoch.log 2>&1
say "epoch: rc=$? launch-to-exit $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s; $(grep -E 'time:' $OUT/epoch.log | cut -c1-160)"
cp /tmp/epoch-aa/summary.json $OUT/epoch-summary.json 2>/dev/null
