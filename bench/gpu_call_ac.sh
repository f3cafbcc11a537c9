#!/usr/bin/env bash
# GPU call AC (a fresh machine after call AB, ~5 min), issue 6: the q,v pair of call X twice more, interleaved, to see
# whether call X's median ratio (1.485x, pairs 1.44/1.49/1.49) holds on another start of the box.
# run: . .gpu/env.sh; bash bench/gpu_call_ac.sh     (carry [".gpu"])
set -uo pipefail
M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
timeout 280 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-ac --steps 30 --warmup 5 --repeat 2 \
  --scratch /tmp/bench-ac --runs "lorafit:llama2_guanaco_fast,trl_tuned" 2>&1 | tee $OUT/qv.jsonl | tail -3
cp /tmp/res-ac/results.json $OUT/qv.json 2>/dev/null
