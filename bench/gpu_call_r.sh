#!/usr/bin/env bash
# GPU call R (one H200, ~4 min of work, fresh machine), issue 6:
#   1. why every process on this box compiles its imports from source (call O's cProfile of accelerate launch: 2,466
#      compile() calls, 4.8 s): does the image ship .pyc files, may python write them?
#   2. llama2_guanaco_lean with the fused layers it now inherits from the fast recipe (memory goal <= 5.0 GiB)
#   3. one epoch of llama2_guanaco_fast through accelerate launch, with PYTHONPYCACHEPREFIX pointing python's bytecode
#      cache at a writable folder that steps 1-2 and a launch probe filled, as a pip install (which compiles .pyc
#      files) would have it
# run: . .gpu/env.sh; bash bench/gpu_call_r.sh     (carry [".gpu"]; results in $OUT, written as they come)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/r.txt; }
M=/tmp/llama2-7b-random
python3 - <<'PY' 2>&1 | tee -a $OUT/r.txt
import importlib.util, os, pathlib, sys
print("dont_write_bytecode", sys.dont_write_bytecode, "PYTHONDONTWRITEBYTECODE", os.environ.get("PYTHONDONTWRITEBYTECODE"),
      "pycache_prefix", sys.pycache_prefix)
for mod in ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes"):
    d = pathlib.Path(importlib.util.find_spec(mod).origin).parent
    print(mod, d, "writable", os.access(d, os.W_OK), "pyc files", len(list(d.rglob("*.pyc"))), "py files", len(list(d.rglob("*.py"))))
PY
export PYTHONPYCACHEPREFIX=/tmp/pyc
python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
timeout 100 python3 bench/throughput.py --model $M --data $GUANACO_1K --out /tmp/res-r/lean --steps 30 --warmup 5 \
  --scratch /tmp/bench-r --runs "lorafit:llama2_guanaco_lean" 2>&1 | tail -2 | tee -a $OUT/r.txt
cp /tmp/res-r/lean/results.json $OUT/lean.json 2>/dev/null
say "lean done"
echo 'import time; print(time.time())' > /tmp/child.py
for i in 1 2; do s=$(date +%s.%N); c=$(accelerate launch --config_file launch/single_gpu.yaml /tmp/child.py 2>/dev/null | tail -1)
  say "accelerate launch until its child runs ($i): $(python3 -c "print(round($c-$s,2))") s"; done
t0=$(date +%s.%N); echo "launch $(date +%T.%N)" > $OUT/epoch-wall.txt
timeout 100 accelerate launch --config_file launch/single_gpu.yaml src/train.py --recipe llama2_guanaco_fast \
  --set model.name=$M --set data.path=$GUANACO_1K --set output.dir=/tmp/epoch-r --set logging.progress_bar=false \
  > $OUT/epoch.log 2>&1
echo "exit $(date +%T.%N) rc=$? launch-to-exit $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s" >> $OUT/epoch-wall.txt
cp /tmp/epoch-r/summary.json $OUT/epoch-summary.json 2>/dev/null; cat $OUT/epoch-wall.txt; grep -E "time:" $OUT/epoch.log
say "epoch done"
