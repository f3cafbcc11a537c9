#!/usr/bin/env bash
# Speed suite: lorafit's recipes against the tuned TRL reference on the Llama-2-7B shape, one GPU.
#
# What it measures. Each pair runs interleaved in one bench/throughput.py invocation (A B A B), so its rows share the
# GPU, the machine's state and the clock; trl_tuned is plain TRL as well tuned as it goes (bench/trl_reference.py
# --tuned: gradient checkpointing off, bfd packing, flex attention). Model: bench/make_checkpoint.py's 7B-shaped
# checkpoint (random weights, the real Llama-2 tokenizer), guanaco-llama2-1k, STEPS steps after WARMUP warm-up steps.
# Parts, run in this order (PARTS picks some):
#   qv          llama2_guanaco_fast against trl_tuned, LoRA on q,v, REPEAT times           -> speed-qv.json
#   all_linear  llama2_guanaco_all_linear against trl_tuned_all_linear, REPEAT_ALL_LINEAR times
#                                                                                            -> speed-all-linear.json
#   lean        llama2_guanaco_lean alone: the memory-lean recipe's peak memory and speed    -> memory-lean.json
#   epoch       one epoch of llama2_guanaco_fast, `accelerate launch --config_file launch/single.yaml src/train.py`,
#               timed by the shell from launch to exit: once as the box is (its image lets no process write
#               bytecode, so each one compiles torch's Python from source), then EPOCH_CACHED times with bytecode
#               cached as a pip install has it (PYTHONDONTWRITEBYTECODE unset, PYTHONPYCACHEPREFIX filled first)
#                                                        -> epoch-box-summary.json, epoch-cached-N-summary.json
#   seed        (not in the default PARTS) llama2_guanaco against trl_seed, the seed settings -> speed-seed.json
# Every part also writes its table and timings to speed.txt, each run's result line as it ends to the part's .jsonl,
# and the epochs' console logs to epoch-*.log, all under "${OUT:-/tmp/bench-out}".
#
# Run it on the GPU box from the project root, after the bundle's environment (bench/README.md):
#   . .gpu/env.sh; PARTS="qv all_linear" bash bench/suites/speed.sh      # ~8 min
#   . .gpu/env.sh; PARTS="lean epoch" bash bench/suites/speed.sh         # ~5 min (same warm machine: checkpoint kept)
#   . .gpu/env.sh; bash bench/suites/speed.sh                            # all four, ~13 min
# Environment: OUT, MODEL (/tmp/llama2-7b-random, made when missing, ~40 s), STEPS (30), WARMUP (5), REPEAT (2),
# REPEAT_ALL_LINEAR (2), EPOCH_CACHED (2), PARTS ("qv all_linear lean epoch"), CUDA_VISIBLE_DEVICES (0).
# The epochs read their rows from data.cache when a throughput run before them tokenized guanaco with the same
# settings; alone, the first epoch tokenizes (~2 s more).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${GUANACO_1K:?run . .gpu/env.sh first (it sets GUANACO_1K and LLAMA2_TOKENIZER)}"
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
M=${MODEL:-/tmp/llama2-7b-random}
STEPS=${STEPS:-30}; WARMUP=${WARMUP:-5}; REPEAT=${REPEAT:-2}; REPEAT_ALL_LINEAR=${REPEAT_ALL_LINEAR:-2}
EPOCH_CACHED=${EPOCH_CACHED:-2}; PARTS=${PARTS:-qv all_linear lean epoch}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one process that sees several GPUs is refused
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/speed.txt"; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

say "speed suite: PARTS=\"$PARTS\" on" \
  "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader -i 0)"
[ -f "$M/config.json" ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer "$LLAMA2_TOKENIZER" --out "$M" 2>&1 \
  | tail -1
say "checkpoint ready: $M"

pair() {  # $1: output name, $2: repeats, $3: runs; ~60 s per run, a stuck one is cut at 150 s per run
  local runs=$3 n
  n=$(( $(tr -cd , <<<"$runs" | wc -c) + 1 ))
  : > "$OUT/$1.jsonl"
  timeout $(( 150 * n * $2 )) python3 bench/throughput.py --model "$M" --data "$GUANACO_1K" \
    --out "/tmp/bench-speed/$1" --steps "$STEPS" --warmup "$WARMUP" --repeat "$2" --scratch /tmp/bench-speed/runs \
    --runs "$runs" 2>&1 |
    while IFS= read -r line; do  # each run's JSON line as it ends; the table to speed.txt
      case $line in "{"*) echo "$line" >> "$OUT/$1.jsonl" ;; *) echo "$line" | tee -a "$OUT/speed.txt" ;; esac
    done
  cp "/tmp/bench-speed/$1/results.json" "$OUT/$1.json" 2>/dev/null
  say "$1 done"
}
want qv && pair speed-qv "$REPEAT" "lorafit:llama2_guanaco_fast,trl_tuned"
want all_linear && pair speed-all-linear "$REPEAT_ALL_LINEAR" "lorafit:llama2_guanaco_all_linear,trl_tuned_all_linear"
want lean && pair memory-lean 1 "lorafit:llama2_guanaco_lean"
want seed && pair speed-seed "$REPEAT" "lorafit:llama2_guanaco,trl_seed"

epoch() {  # $1: tag
  local t0 rc
  rm -rf "/tmp/bench-epoch-$1"  # an output folder with checkpoints in it would be resumed
  t0=$(date +%s.%N)
  timeout 150 accelerate launch --config_file launch/single.yaml src/train.py --recipe llama2_guanaco_fast \
    --set "model.name=$M" --set "data.path=$GUANACO_1K" --set "output.dir=/tmp/bench-epoch-$1" \
    --set logging.progress_bar=false > "$OUT/epoch-$1.log" 2>&1
  rc=$?
  say "epoch $1: rc=$rc launch-to-exit $(elapsed "$t0") s; $(grep -E 'time:' "$OUT/epoch-$1.log" | cut -c1-160)"
  cp "/tmp/bench-epoch-$1/summary.json" "$OUT/epoch-$1-summary.json" 2>/dev/null
}
if want epoch; then
  epoch box
  if [ "$EPOCH_CACHED" -gt 0 ]; then
    (
      unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
      # fill the cache as an install would have it: the training script's imports and accelerate's launcher
      python3 src/train.py --recipe llama2_guanaco_fast --set "model.name=$M" --print-config > /dev/null 2>&1
      python3 -c "import peft, trl, bitsandbytes, liger_kernel, deepspeed, accelerate.commands.launch" 2>/dev/null
      for i in $(seq "$EPOCH_CACHED"); do epoch "cached-$i"; done
    )
  fi
fi
say "speed suite done"
