#!/usr/bin/env bash
# GPU call A (one H100): GPU test tier, the 7B-shaped random checkpoint, issue 2's 30-step run and the throughput table.
#   run: . .gpu/env.sh; bash bench/gpu_call_a.sh      (results under $OUT)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch,transformers,peft,trl,bitsandbytes,accelerate;print(torch.__version__,transformers.__version__,peft.__version__,trl.__version__,bitsandbytes.__version__,accelerate.__version__)" | tee -a $OUT/gpu.txt
say "gpu tests"; timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee $OUT/pytest_gpu.txt
M=/tmp/llama2-7b-random
[ -f $M/config.json ] || { say "make 7b"; python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1; }
say "throughput"
python3 bench/throughput.py --model $M --data $GUANACO_1K --out $OUT/tp --steps ${STEPS:-30} --warmup 5 \
  --runs "${RUNS:-lorafit:llama2_guanaco,trl_seed,trl_tuned,lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+training.liger_kernels=false}" 2>&1 | tail -12
say "done"
