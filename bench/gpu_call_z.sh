#!/usr/bin/env bash
# GPU call Z (next session, after calls X and Y on the same warm machine, ~3 min), issue 6:
#   llama2_guanaco_fast with bitsandbytes' NF4 dequantize and with lorafit's Triton kernel
#   (quantization.dequant_kernel=triton), A B A B, per-step times in the results
# run: . .gpu/env.sh; bash bench/gpu_call_z.sh     (carry [".gpu"]; needs call X's checkpoint)
set -uo pipefail
M=/tmp/llama2-7b-random
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
timeout 330 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-z --steps 30 --warmup 5 --repeat 2 \
  --scratch /tmp/bench-z --runs "lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+quantization.dequant_kernel=triton" \
  2>&1 | tee $OUT/z.jsonl | tail -3
cp /tmp/res-z/results.json $OUT/z.json 2>/dev/null
