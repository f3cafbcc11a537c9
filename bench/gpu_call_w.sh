#!/usr/bin/env bash
# GPU call W (2026-12-02, the session's last ~4 min of device time), issue 6: call V's A/B had one slow run of the
# sync-free path; one more A B A of llama2_guanaco_fast with and without the two sync-free pieces, now with every
# step's time in the results (summary.json logged_step_times_s). Output streams to $OUT as each run ends.
# run: . .gpu/env.sh; bash bench/gpu_call_w.sh     (carry [".gpu"])
set -uo pipefail
M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
for spec in lorafit:llama2_guanaco_fast lorafit:llama2_guanaco_fast+env:LORAFIT_BENCH_OFF=mask_skip/indexed_lm_head \
            lorafit:llama2_guanaco_fast; do
  python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-w --steps 30 --warmup 5 \
    --scratch /tmp/bench-w --runs "$spec" 2>&1 | grep '^{' >> $OUT/w.jsonl
done
