#!/usr/bin/env bash
# GPU call Q (one H200, ~6 min, on call O's warm machine after call P), issue 6: the commands that ran, inline, then
# call Q2 (the profile of one fused fast step).
#   1. keep_dequantized on and off, interleaved with tuned TRL, twice (A B C A B C): call P's single pair (+13%) was
#      suspect because the same recipe had run 7% faster in call O
#   2. the all-linear recipe with kept weights, beside tuned TRL all-linear
#   Q2. bench/profile_step.py over 3 steady steps of llama2_guanaco_fast (fused layers on)
# run: . .gpu/env.sh; bash bench/gpu_call_q.sh     (carry [".gpu"]; needs call O's /tmp/llama2-7b-random)
set -uo pipefail
M=/tmp/llama2-7b-random; R=/tmp/res-q; mkdir -p $R
timeout 400 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/ab --steps 30 --warmup 5 --repeat 2 \
  --scratch /tmp/bench-q --runs "lorafit:llama2_guanaco_fast+quantization.keep_dequantized=true,lorafit:llama2_guanaco_fast,trl_tuned" 2>&1 | tail -5
timeout 150 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/al --steps 30 --warmup 5 \
  --scratch /tmp/bench-q2 --runs "lorafit:llama2_guanaco_all_linear+quantization.keep_dequantized=true,trl_tuned_all_linear" 2>&1 | tail -3
tar czf $OUT/q.tgz -C /tmp res-q
# Q2, a separate call on the same machine:
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/profile_step.py --recipe llama2_guanaco_fast --set model.name=$M \
  --set data.path=$GUANACO_1K --warmup 5 --steps 3 --out /tmp/prof-fused > /tmp/prof.log 2>&1
rm -f /tmp/prof-fused/trace.json; gzip -c /tmp/prof-fused/summary.json > $OUT/summary.json.gz
cp /tmp/prof-fused/ops_cuda.txt /tmp/prof-fused/ops_cpu.txt $OUT/
