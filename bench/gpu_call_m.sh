#!/usr/bin/env bash
# GPU call M (one H200, ~8 min), issue 6: the side-by-side table after this session's changes, in one invocation:
# plain TRL (seed settings; tuned: GC off, bfd packing, flex attention; tuned all-linear) against lorafit's recipes;
# then one more epoch of llama2_guanaco_fast with warm caches, timed at launch, at each phase and at exit.
# run: . .gpu/env.sh; bash bench/gpu_call_m.sh     (carry [".gpu"]; results in $OUT)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-m; mkdir -p $R; M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
timeout 420 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/table --steps 30 --warmup 5 \
  --scratch /tmp/bench-m --runs "lorafit:llama2_guanaco_fast,trl_tuned,lorafit:llama2_guanaco_all_linear,trl_tuned_all_linear,lorafit:llama2_guanaco,trl_seed" 2>&1 | tail -8
say "table done"
# one epoch again, warm caches (the same machine ran it in call K): launch time, lorafit's phases, exit time
t0=$(date +%s.%N); echo "launch $(date +%T.%N)" > $R/epoch-wall.txt
timeout 100 accelerate launch --config_file launch/single_gpu.yaml src/train.py --recipe llama2_guanaco_fast \
  --set model.name=$M --set data.path=$GUANACO_1K --set output.dir=/tmp/epoch-m --set logging.progress_bar=false \
  > $R/epoch.log 2>&1
echo "exit $(date +%T.%N) rc=$? launch-to-exit $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s" >> $R/epoch-wall.txt
cp /tmp/epoch-m/summary.json $R/epoch-summary.json 2>/dev/null; cat $R/epoch-wall.txt; grep -E "time:" $R/epoch.log
tar czf $OUT/m.tgz -C /tmp res-m; ls -la $OUT
