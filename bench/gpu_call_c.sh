#!/usr/bin/env bash
# GPU call C (4 H100s, ~9 min; chained after B on the same warm box): checkpoint round trips (DDP on GPUs 0,1 and
# ZeRO-3 on GPUs 2,3 side by side), then DDP / ZeRO-2 / ZeRO-3 on all 4 GPUs.
# run: . .gpu/env.sh; bash bench/gpu_call_c.sh      (results packed into $OUT/c.tgz)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-c; mkdir -p $R; M=/tmp/llama2-7b-random; export MODEL=$M
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "round trips"
( CUDA_VISIBLE_DEVICES=0,1 LORAFIT_BENCH_PORT=29621 bash bench/ckpt_roundtrip.sh $R/ckpt ddp ) > $R/ckpt_ddp.out 2>&1 &
( CUDA_VISIBLE_DEVICES=2,3 LORAFIT_BENCH_PORT=29622 bash bench/ckpt_roundtrip.sh $R/ckpt zero3 ) > $R/ckpt_zero3.out 2>&1 &
wait
say "4-GPU layouts"
python3 bench/layouts.py --model $M --data $GUANACO_1K --out $R/layouts --gpus 4 --layouts ddp,zero2,zero3 --steps 20 > $R/lanes4.log 2>&1
say "done"
tail -5 $R/ckpt_ddp.out $R/ckpt_zero3.out; cat $R/ckpt/*.json 2>/dev/null | head -60; tail -8 $R/lanes4.log
python3 bench/layouts.py --table $R/layouts 2>&1 | tail -8
tar czf $OUT/c.tgz -C /tmp res-c; ls -la $OUT
