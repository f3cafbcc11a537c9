#!/usr/bin/env bash
# GPU call K (one H200, alone, ~8 min), issue 6: the new fast-path levers on and off, and the one-epoch run.
#   1. GPU tests of the new pieces: the varlen flash kernel against each row attended alone, the sync-free AdamW
#      against paged AdamW 32-bit
#   2. bench/throughput.py, one invocation: llama2_guanaco_fast (varlen + lorafit_adamw_32bit), the same with
#      flex_attention (the previous default), the same with paged_adamw_32bit (the previous optimizer)
#   3. one epoch of llama2_guanaco_fast through `accelerate launch`, timed from launch to the saved adapter
# run: . .gpu/env.sh; bash bench/gpu_call_k.sh     (carry [".gpu", ".smolA"]; results in $OUT)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-k; mkdir -p $R /tmp/smol; M=/tmp/llama2-7b-random
cp .smolA/* /tmp/smol/ 2>/dev/null  # first half of the SmolLM2 GGUF, joined in call L
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv > $R/gpu.txt
python3 -c "import torch, transformers, peft, trl, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, trl.__version__, b.__version__)" >> $R/gpu.txt
cat $R/gpu.txt
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -k "varlen or sync_free or fast-lorafit" -v \
  -p no:cacheprovider > $R/tests.log 2>&1
say "gpu tests rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed" $R/tests.log | tail -8
timeout 330 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/levers --steps 30 --warmup 5 \
  --scratch /tmp/bench-k --runs "lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+model.attn_implementation=flex_attention,lorafit:llama2_guanaco_fast+training.optimizer=paged_adamw_32bit" 2>&1 | tail -5
say "levers done"
t0=$(date +%s.%N)
timeout 150 accelerate launch --config_file launch/single_gpu.yaml src/train.py --recipe llama2_guanaco_fast \
  --set model.name=$M --set data.path=$GUANACO_1K --set output.dir=/tmp/epoch-k --set logging.progress_bar=false \
  > $R/epoch.log 2>&1
echo "epoch rc=$? launch-to-exit $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s" | tee $R/epoch-wall.txt
cp /tmp/epoch-k/summary.json $R/epoch-summary.json 2>/dev/null; grep -E "time:|done:" $R/epoch.log
say "epoch done"
tar czf $OUT/k.tgz -C /tmp res-k; ls -la $OUT
