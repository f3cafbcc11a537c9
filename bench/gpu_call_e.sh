#!/usr/bin/env bash
# GPU call E (4 H100s, < 10 min), three lanes side by side, each on its own GPUs:
#   GPUs 0,1: DDP checkpoint round trip (after the paged-optimizer resume fix), then the 2-GPU loss-parity check
#   GPU 2:    SmolLM2-135M on guanaco (issue 7: eval loss before/after, samples), then the fast path's loss parity on
#             identical batches of that real model (issue 6)
#   GPU 3:    issue 6 levers on the 7B-shaped model: seed / fast / fast padding-free / lean / lean + activation offload
# Needs the SmolLM2 GGUF pieces in /tmp/smol (two earlier calls on the same warm box; see bench/smollm2_guanaco.sh).
# run: . .gpu/env.sh; bash bench/gpu_call_e.sh      (results packed into $OUT/e.tgz)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-e; mkdir -p $R; M=/tmp/llama2-7b-random; export MODEL=$M
G=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee $R/gpu.txt
python3 -c "import torch,transformers,peft,trl,bitsandbytes,accelerate;print(torch.__version__,transformers.__version__,peft.__version__,trl.__version__,bitsandbytes.__version__,accelerate.__version__)" | tee $R/versions.txt
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
say "lanes start"
( export CUDA_VISIBLE_DEVICES=0,1 LORAFIT_BENCH_PORT=29631
  timeout 300 bash bench/ckpt_roundtrip.sh $R/ckpt ddp; say "round trip done"
  timeout 170 python3 bench/layouts.py --model $M --data $GUANACO_1K --out $R/layouts --parity; say "parity done"
) > $R/lane01.log 2>&1 &
( export CUDA_VISIBLE_DEVICES=2
  timeout 290 bash bench/smollm2_guanaco.sh $G $R/smol; say "smollm2 done"
  timeout 190 python3 bench/loss_parity.py --model $G --data $GUANACO_1K --out $R/loss_parity --steps 50 --packed
  say "loss parity done"
) > $R/lane2.log 2>&1 &
( timeout 480 bash -c 'CUDA_VISIBLE_DEVICES=3 python3 bench/throughput.py --model $MODEL --data $GUANACO_1K \
    --out '$R'/i6e3 --steps 30 --warmup 5 --scratch /tmp/bench-e3 --runs \
    "lorafit:llama2_guanaco_lean+training.activation_offloading=true,lorafit:llama2_guanaco_lean,lorafit:llama2_guanaco_fast+data.packing=false+data.padding_free=true,lorafit:llama2_guanaco,lorafit:llama2_guanaco_fast"' 2>&1 | tail -9
) > $R/lane3.log 2>&1 &
wait
say "lanes done"
tail -4 $R/lane01.log; tail -6 $R/lane2.log; tail -9 $R/lane3.log
cat $R/ckpt/*.json 2>/dev/null | head -40; cat $R/layouts/parity.json 2>/dev/null | head -30
python3 -c "import json;d=json.load(open('$R/loss_parity/loss_parity.json'));[print(k,{x:y for x,y in v.items() if x!='curves'}) for k,v in d['pairs'].items()]" 2>&1 | tail -3
tar czf $OUT/e.tgz -C /tmp res-e; ls -la $OUT
