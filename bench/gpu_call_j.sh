#!/usr/bin/env bash
# GPU call J (one H100, alone, ~8 min): the GPU test tier, then the side-by-side table with this session's changes
# (cuDNN attention off for sdpa, dataloader workers in the fast recipe, host-overhead fixes) against plain TRL.
# run: . .gpu/env.sh; bash bench/gpu_call_j.sh      (results: $OUT/tests.log, $OUT/j.tgz)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-j; mkdir -p $R; M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
CUDA_VISIBLE_DEVICES=0 timeout 190 python3 -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider > $OUT/tests.log 2>&1
say "gpu tests rc=$?"; grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" $OUT/tests.log | tail -8
timeout 320 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/table --steps 30 --warmup 5 \
  --scratch /tmp/bench-j --runs "lorafit:llama2_guanaco_fast,trl_tuned,lorafit:llama2_guanaco,trl_seed" 2>&1 | tail -6
say "table done"
tar czf $OUT/j.tgz -C /tmp res-j; ls -la $OUT
