#!/usr/bin/env bash
# GPU call H (one H100, alone, ~8 min): where the fast path's step time goes, then three cheap levers side by side.
#   1. bench/profile_step.py on llama2_guanaco_fast and on llama2_guanaco (seed settings): device busy vs wall per step
#   2. bench/throughput.py: llama2_guanaco_fast; + adamw_torch_fused instead of paged AdamW; + logging every 10 steps
# run: . .gpu/env.sh; bash bench/gpu_call_h.sh      (results packed into $OUT/h.tgz)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-h; mkdir -p $R; M=/tmp/llama2-7b-random
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee $R/gpu.txt
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
for rec in llama2_guanaco_fast llama2_guanaco; do
  timeout 150 python3 bench/profile_step.py --recipe $rec --set model.name=$M --set data.path=$GUANACO_1K \
    --warmup 5 --steps 3 --out $R/prof-$rec > $R/prof-$rec.log 2>&1; say "profile $rec rc=$?"; tail -2 $R/prof-$rec.log
  gzip -f $R/prof-$rec/trace.json 2>/dev/null
done
timeout 260 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/levers --steps 30 --warmup 5 \
  --scratch /tmp/bench-h --runs "lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+training.optimizer=adamw_torch_fused,lorafit:llama2_guanaco_fast+logging.steps=10" 2>&1 | tail -6
say "levers done"
tar czf $OUT/h.tgz -C /tmp res-h; ls -la $OUT
