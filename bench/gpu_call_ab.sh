#!/usr/bin/env bash
# GPU call AB (right after call AA, same warm machine, ~2 min), issue 6: the epoch of call AA again with bytecode
# cached the way a pip install has it (call T's method: PYTHONDONTWRITEBYTECODE unset, PYTHONPYCACHEPREFIX on a
# writable folder that a first import fills), twice, to separate the box's per-process compile of torch from lorafit.
# run: . .gpu/env.sh; bash bench/gpu_call_ab.sh     (carry [".gpu"]; needs call X's /tmp/llama2-7b-random)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/ab.txt; }
M=/tmp/llama2-7b-random
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
python3 src/train.py --recipe llama2_guanaco_fast --set model.name=$M --print-config > /dev/null 2>&1
python3 -c "import peft, trl, bitsandbytes, liger_kernel, deepspeed, accelerate.commands.launch" 2>/dev/null
for i in 1 2; do
  t0=$(date +%s.%N)
  timeout 100 accelerate launch --config_file launch/single_gpu.yaml src/train.py --recipe llama2_guanaco_fast \
    --set model.name=$M --set data.path=$GUANACO_1K --set output.dir=/tmp/epoch-ab$i --set logging.progress_bar=false \
    > $OUT/epoch-$i.log 2>&1
  say "epoch cached $i: rc=$? launch-to-exit $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s; $(grep -E 'time:' $OUT/epoch-$i.log | cut -c1-160)"
  cp /tmp/epoch-ab$i/summary.json $OUT/epoch-$i-summary.json 2>/dev/null
done
