#!/usr/bin/env bash
# GPU call T (next session, on call S's warm machine, ~9 min), issue 6:
#   1. the all-linear pair, twice interleaved: llama2_guanaco_all_linear with its optimizer and with paged AdamW, and
#      tuned TRL all-linear
#   2. one epoch of llama2_guanaco_fast through accelerate launch as the box is (python compiles torch from source in
#      every process), then again with bytecode cached the way a pip install has it: PYTHONDONTWRITEBYTECODE unset and
#      PYTHONPYCACHEPREFIX on a writable folder that a first launch fills (call R set only the prefix: nothing was
#      written, and the .pyc files transformers ships were ignored)
# The throughput runs before it tokenize guanaco with the same data settings, so both epochs load the rows from
# data.cache (a repeat run's start-up; the epochs of calls K-P tokenized).
# run: . .gpu/env.sh; bash bench/gpu_call_t.sh     (carry [".gpu"]; needs call S's /tmp/llama2-7b-random)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/t.txt; }
M=/tmp/llama2-7b-random
timeout 330 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-t/al --steps 30 --warmup 5 --repeat 2 \
  --scratch /tmp/bench-t --runs "lorafit:llama2_guanaco_all_linear,lorafit:llama2_guanaco_all_linear+training.optimizer=paged_adamw_32bit,trl_tuned_all_linear" 2>&1 | tail -4 | tee -a $OUT/t.txt
cp /tmp/res-t/al/results.json $OUT/al.json 2>/dev/null
say "all-linear table done"
epoch() {  # $1: tag
  local t0; t0=$(date +%s.%N)
  timeout 110 accelerate launch --config_file launch/single_gpu.yaml src/train.py --recipe llama2_guanaco_fast \
    --set model.name=$M --set data.path=$GUANACO_1K --set output.dir=/tmp/epoch-$1 --set logging.progress_bar=false \
    > $OUT/epoch-$1.log 2>&1
  say "epoch $1: rc=$? launch-to-exit $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s; $(grep -E 'time:' $OUT/epoch-$1.log | cut -c1-160)"
  cp /tmp/epoch-$1/summary.json $OUT/epoch-$1-summary.json 2>/dev/null
}
epoch box
echo 'import time; print(time.time())' > /tmp/child.py
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
python3 src/train.py --recipe llama2_guanaco_fast --set model.name=$M --print-config > /dev/null 2>&1
python3 -c "import peft, trl, bitsandbytes, liger_kernel, deepspeed" 2>/dev/null
for i in 1 2; do s=$(date +%s.%N); c=$(accelerate launch --config_file launch/single_gpu.yaml /tmp/child.py 2>/dev/null | tail -1)
  say "bytecode cached: accelerate launch until its child runs ($i): $(python3 -c "print(round($c-$s,2))") s"; done
epoch cached
