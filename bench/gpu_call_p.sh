#!/usr/bin/env bash
# GPU call P (one H200, ~8 min, call O's machine if still warm), issue 6, after lorafit.fused:
#   1. loss parity on SmolLM2-135M (the fast side now runs the fused 4-bit LoRA layers); needs .smolA from call O
#   2. quantization.keep_dequantized on and off (call O's table ran out of time before it)
#   3. one epoch of llama2_guanaco_fast through accelerate launch, timed launch to exit
# run: . .gpu/env.sh; bash bench/gpu_call_p.sh     (carry [".gpu", ".smolB"]; results in $OUT)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-p; mkdir -p $R /tmp/smol; M=/tmp/llama2-7b-random; G=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/smol/part.00 .smolB/part.01 > $G 2>/dev/null
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c - && have_smol=1 || have_smol=0
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "smol=$have_smol, checkpoint ready"
timeout 150 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/keep --steps 30 --warmup 5 \
  --scratch /tmp/bench-p --runs "lorafit:llama2_guanaco_fast+quantization.keep_dequantized=true,lorafit:llama2_guanaco_fast" 2>&1 | tail -3
say "keep done"
t0=$(date +%s.%N); echo "launch $(date +%T.%N)" > $R/epoch-wall.txt
timeout 100 accelerate launch --config_file launch/single_gpu.yaml src/train.py --recipe llama2_guanaco_fast \
  --set model.name=$M --set data.path=$GUANACO_1K --set output.dir=/tmp/epoch-p --set logging.progress_bar=false \
  > $R/epoch.log 2>&1
echo "exit $(date +%T.%N) rc=$? launch-to-exit $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s" >> $R/epoch-wall.txt
cp /tmp/epoch-p/summary.json $R/epoch-summary.json 2>/dev/null; cat $R/epoch-wall.txt; grep -E "time:" $R/epoch.log
say "epoch done"
if [ $have_smol = 1 ]; then
  timeout 230 python3 bench/loss_parity.py --model $G --data $GUANACO_1K --out $R/parity --steps 50 2>&1 | tail -3
  say "parity done"
fi
tar czf $OUT/p.tgz -C /tmp res-p; ls -la $OUT
