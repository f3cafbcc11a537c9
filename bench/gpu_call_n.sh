#!/usr/bin/env bash
# GPU call N (one H200, ~6 min), issue 6's one-epoch goal: where the time before the first step goes on the box.
#   1. import times of train.py's imports (python -X importtime, through --print-config: imports + layout only)
#   2. CUDA start-up alone, and `accelerate launch`'s own cost before it starts the training process
#   3. one epoch of llama2_guanaco_fast started with plain python (no accelerate launch), timed launch to exit
#   4. the optimizer lever again, repeated: llama2_guanaco_fast with and without lorafit_adamw_32bit, A B A B
# run: . .gpu/env.sh; bash bench/gpu_call_n.sh     (carry [".gpu"]; results in $OUT)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-n; mkdir -p $R; M=/tmp/llama2-7b-random
python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "checkpoint ready"
for i in 1 2; do  # the first pays for cold files and byte-compiling; the second is what a later run pays
  s=$(date +%s.%N); python3 -X importtime src/train.py --recipe llama2_guanaco_fast --set model.name=$M --print-config \
    > /dev/null 2> $R/importtime-$i.txt; echo "imports+layout run $i: $(python3 -c "print(round($(date +%s.%N)-$s,2))") s"
done
sort -t'|' -k2 -n $R/importtime-2.txt | tail -12 | cut -c1-110
s=$(date +%s.%N); python3 -c "import torch; torch.cuda.init(); torch.zeros(1, device='cuda')"
echo "python + import torch + CUDA context: $(python3 -c "print(round($(date +%s.%N)-$s,2))") s"
echo 'import time; print(time.time())' > /tmp/child.py
s=$(date +%s.%N); c=$(accelerate launch --config_file launch/single_gpu.yaml /tmp/child.py 2>/dev/null | tail -1)
echo "accelerate launch until its child runs: $(python3 -c "print(round($c-$s,2))") s"
say "start-up probes done"
t0=$(date +%s.%N); echo "launch $(date +%T.%N)" > $R/epoch-wall.txt
timeout 100 python3 src/train.py --recipe llama2_guanaco_fast --set model.name=$M --set data.path=$GUANACO_1K \
  --set output.dir=/tmp/epoch-n --set logging.progress_bar=false > $R/epoch.log 2>&1
echo "exit $(date +%T.%N) rc=$? launch-to-exit $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s" >> $R/epoch-wall.txt
cp /tmp/epoch-n/summary.json $R/epoch-summary.json 2>/dev/null; cat $R/epoch-wall.txt; grep -E "time:" $R/epoch.log
say "epoch done"
timeout 190 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/opt --steps 30 --warmup 5 --repeat 2 \
  --scratch /tmp/bench-n --runs "lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+training.optimizer=paged_adamw_32bit" 2>&1 | tail -4
say "optimizer A/B done"
tar czf $OUT/n.tgz -C /tmp res-n; ls -la $OUT
