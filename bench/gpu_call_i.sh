#!/usr/bin/env bash
# GPU call I (one H100, alone, ~8 min), after call H's profile:
#   1. the seed recipe with and without cuDNN's attention kernel (a new plan per padded shape, seen in call H)
#   2. the fast path: the code before this call's host-overhead fixes (.snap, a copy of the previous commit) against
#      the new code, then fused torch AdamW, dataloader workers, and all of them with torch.compile
# run: . .gpu/env.sh; bash bench/gpu_call_i.sh      (results packed into $OUT/i.tgz; needs carry [".gpu", ".snap"])
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-i; mkdir -p $R; M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
tp() { timeout $1 python3 $2/bench/throughput.py --model $M --data $GUANACO_1K --out $R/$3 --steps 30 --warmup 5 \
         --scratch /tmp/bench-i --runs "$4" 2>&1 | tail -7; say "$3 done"; }
tp 150 .snap fast-before "lorafit:llama2_guanaco_fast"
tp 330 . fast "lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+training.optimizer=adamw_torch_fused,lorafit:llama2_guanaco_fast+training.dataloader_num_workers=2,lorafit:llama2_guanaco_fast+training.optimizer=adamw_torch_fused+training.dataloader_num_workers=2+training.torch_compile=true"
tp 170 . seed "lorafit:llama2_guanaco+model.sdpa_cudnn=true,lorafit:llama2_guanaco"
tar czf $OUT/i.tgz -C /tmp res-i; ls -la $OUT
