#!/usr/bin/env bash
# GPU call B (4 H100s, ~9 min), three lanes side by side (each lane on its own GPUs, one launch port each):
#   GPU 0: issue 6 set a (TRL references + lorafit seed/fast/bigger micro-batch), then one timed epoch
#   GPU 1: issue 6 set b (lean mode, all-linear vs TRL all-linear, torch.compile)
#   GPUs 2,3: layouts single (1 GPU), then DDP / ZeRO-2 / ZeRO-3 on 2 GPUs, then the 2-GPU loss-parity check
# run: . .gpu/env.sh; bash bench/gpu_call_b.sh      (results packed into $OUT/b.tgz)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-b; mkdir -p $R; M=/tmp/llama2-7b-random; export MODEL=$M
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee $R/gpu.txt
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "lanes start"
( bash bench/issue6_runs.sh 0 a $R/i6a; bash bench/issue6_runs.sh 0 epoch $R/i6e ) > $R/lane0.log 2>&1 &
( bash bench/issue6_runs.sh 1 b $R/i6b ) > $R/lane1.log 2>&1 &
( export CUDA_VISIBLE_DEVICES=2,3 LORAFIT_BENCH_PORT=29611
  python3 bench/layouts.py --model $M --data $GUANACO_1K --out $R/layouts --gpus 1 --layouts single --steps 20
  python3 bench/layouts.py --model $M --data $GUANACO_1K --out $R/layouts --gpus 2 --layouts ddp,zero2,zero3 --steps 20
  python3 bench/layouts.py --model $M --data $GUANACO_1K --out $R/layouts --parity ) > $R/lane23.log 2>&1 &
wait
say "lanes done"
tail -8 $R/lane0.log $R/lane1.log; tail -12 $R/lane23.log; cat $R/i6e/epoch.json 2>/dev/null
python3 bench/layouts.py --table $R/layouts 2>&1 | tail -12
tar czf $OUT/b.tgz -C /tmp res-b; ls -la $OUT
