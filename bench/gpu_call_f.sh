#!/usr/bin/env bash
# GPU call F (4 H100s, < 10 min; chained after E on the same warm box):
#   1. ZeRO-3 on 4 GPUs (issue 3), alone on the host;
#   2. DDP against ZeRO-2 on GPUs 0,1 over 60 steps each, alone on the host (issue 3's "ZeRO-2 within 5% of DDP");
#   3. side by side: the GPU test tier (pytest -m gpu) on GPUs 0,1 and issue 6's compiled runs on GPU 3.
# run: . .gpu/env.sh; bash bench/gpu_call_f.sh      (results packed into $OUT/f.tgz)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-f; mkdir -p $R; M=/tmp/llama2-7b-random; export MODEL=$M
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee $R/gpu.txt
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "zero3 on 4"
timeout 200 python3 bench/layouts.py --model $M --data $GUANACO_1K --out $R/layouts --gpus 4 --layouts zero3 --steps 20 \
  > $R/zero3_4.log 2>&1
say "ddp vs zero2 on 2, 60 steps"
CUDA_VISIBLE_DEVICES=0,1 timeout 230 python3 bench/layouts.py --model $M --data $GUANACO_1K --out $R/layouts \
  --gpus 2 --layouts ddp,zero2 --steps 60 > $R/ddp_zero2.log 2>&1
say "gpu tests + compiled runs"
( CUDA_VISIBLE_DEVICES=0,1 timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider ) > $R/pytest_gpu.log 2>&1 &
( CUDA_VISIBLE_DEVICES=3 timeout 150 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/i6f --steps 30 \
    --warmup 5 --scratch /tmp/bench-f --runs "lorafit:llama2_guanaco_all_linear+training.torch_compile=true" ) > $R/i6f.log 2>&1 &
wait
say "done"
tail -3 $R/zero3_4.log; tail -3 $R/ddp_zero2.log; tail -5 $R/pytest_gpu.log; tail -3 $R/i6f.log
python3 bench/layouts.py --table $R/layouts 2>&1 | tail -6
tar czf $OUT/f.tgz -C /tmp res-f; ls -la $OUT
