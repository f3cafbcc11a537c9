#!/usr/bin/env bash
# GPU call O (one H200, ~8 min, fresh machine), issue 6: the fused 4-bit LoRA layers (lora.fused) on and off.
#   1. the GPU tests of the fused layer (against PEFT's at a 7B q_proj's size), the sync-free AdamW, the CLI runs
#   2. what `accelerate launch` does for ~13 s on this box before it starts the training process (importtime, cProfile)
#   3. one throughput invocation: tuned TRL and lorafit's fast and all-linear recipes, fused on and off, and fused with
#      the 16-bit weights kept for the backward (quantization.keep_dequantized)
# run: . .gpu/env.sh; bash bench/gpu_call_o.sh     (carry [".gpu", ".smolA"]; results in $OUT)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-o; mkdir -p $R /tmp/smol; M=/tmp/llama2-7b-random
cp .smolA/* /tmp/smol/ 2>/dev/null  # first half of the SmolLM2 GGUF, joined in call P
python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider \
  -k "fused or sync_free or cli_trains" > $R/tests.log 2>&1
say "gpu tests rc=$?"; grep -E "PASSED|FAILED|passed|failed|Error" $R/tests.log | tail -12
echo 'import time; print(time.time())' > /tmp/child.py
A=$(command -v accelerate)
s=$(date +%s.%N); c=$(python3 -X importtime $A launch --config_file launch/single_gpu.yaml /tmp/child.py 2> $R/acc-importtime.txt | tail -1)
echo "accelerate launch (importtime) until its child runs: $(python3 -c "print(round($c-$s,2))") s"
python3 -m cProfile -s cumtime $A launch --config_file launch/single_gpu.yaml /tmp/child.py 2>&1 | head -70 > $R/acc-cprofile.txt
sort -t'|' -k2 -n $R/acc-importtime.txt | tail -8 | cut -c1-110; sed -n 1,30p $R/acc-cprofile.txt | cut -c1-150
say "accelerate probes done"
timeout 330 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/table --steps 30 --warmup 5 \
  --scratch /tmp/bench-o --runs "lorafit:llama2_guanaco_fast,trl_tuned,lorafit:llama2_guanaco_fast+lora.fused=false,lorafit:llama2_guanaco_all_linear,trl_tuned_all_linear,lorafit:llama2_guanaco_all_linear+lora.fused=false,lorafit:llama2_guanaco_fast+quantization.keep_dequantized=true" 2>&1 | tail -10
say "table done"
tar czf $OUT/o.tgz -C /tmp res-o; ls -la $OUT
