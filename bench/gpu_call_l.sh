#!/usr/bin/env bash
# GPU call L (the same warm H200 right after call K, ~7 min), issue 6:
#   1. join the SmolLM2-135M-Instruct GGUF (half from call K, half carried now) and check its sha256
#   2. loss parity of the fast path (varlen attention, sync-free AdamW, Liger, no recompute) against the seed
#      settings on identical batches of that real pretrained model, 50 steps, LoRA dropout 0.1 and 0
#   3. the memory-lean recipe on the 7B shape (its peak with the varlen path)
#   4. the whole GPU test tier
# run: . .gpu/env.sh; bash bench/gpu_call_l.sh     (carry [".gpu", ".smolB"]; results in $OUT)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-l; mkdir -p $R /tmp/smol; M=/tmp/llama2-7b-random; G=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/smol/part.00 .smolB/part.01 > $G 2>/dev/null
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c - && have_smol=1 || have_smol=0
say "smollm2 gguf ok=$have_smol"
if [ $have_smol = 1 ]; then
  timeout 330 python3 bench/loss_parity.py --model $G --data $GUANACO_1K --out $R/parity --steps 50 2>&1 | tail -3
  say "parity done"
fi
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
timeout 120 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/lean --steps 30 --warmup 5 \
  --scratch /tmp/bench-l --runs "lorafit:llama2_guanaco_lean" 2>&1 | tail -3
say "lean done"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider > $R/tests.log 2>&1
say "gpu tier rc=$?"; grep -E "passed|failed" $R/tests.log | tail -2
tar czf $OUT/l.tgz -C /tmp res-l; ls -la $OUT
