#!/usr/bin/env bash
# GPU call Y (next session, on call X's warm machine, ~8 min), issue 6:
#   1. loss parity on SmolLM2-135M-Instruct again, now that the fast side's loss runs on the indexed LM head and the
#      reference keeps TRL's (bench/loss_parity.py), 50 steps, dropout 0.1 and 0
#   2. all-linear side by side, twice interleaved, with the new TRL clock
# run: . .gpu/env.sh; bash bench/gpu_call_y.sh     (carry [".gpu", ".smolB"]; needs call X's /tmp/smol and checkpoint)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/y.txt; }
M=/tmp/llama2-7b-random; G=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/smol/part.00 .smolB/part.01 > $G 2>/dev/null
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c - && have_smol=1 || have_smol=0
say "smollm2 gguf ok=$have_smol"
if [ $have_smol = 1 ]; then
  timeout 240 python3 bench/loss_parity.py --model $G --data $GUANACO_1K --out /tmp/parity --steps 50 2>&1 | tail -2 | tee -a $OUT/y.txt
  cp /tmp/parity/loss_parity.json $OUT/ 2>/dev/null
  say "parity done"
fi
timeout 330 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-y --steps 30 --warmup 5 --repeat 2 \
  --scratch /tmp/bench-y --runs "lorafit:llama2_guanaco_all_linear,trl_tuned_all_linear" 2>&1 | tee $OUT/al.jsonl | tail -3 | tee -a $OUT/y.txt
cp /tmp/res-y/results.json $OUT/al.json 2>/dev/null
say "done"
