#!/usr/bin/env bash
# Issue 6's lever table on one GPU: bash bench/issue6_runs.sh GPU_INDEX SET OUT_DIR   (SET = a | b | epoch)
# Each set is one bench/throughput.py invocation, so its rows are side by side on the same GPU.
set -uo pipefail
gpu=$1; set=$2; out=$3; M=${MODEL:-/tmp/llama2-7b-random}
case $set in
  a) runs="trl_seed,lorafit:llama2_guanaco,trl_tuned,lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_fast+training.per_device_batch_size=8" ;;
  b) runs="lorafit:llama2_guanaco_fast,lorafit:llama2_guanaco_lean,lorafit:llama2_guanaco_lean+quantization.double_quant=true,lorafit:llama2_guanaco_all_linear,trl_tuned_all_linear,lorafit:llama2_guanaco_fast+training.torch_compile=true" ;;
  epoch)  # one epoch, launch to saved adapter (checkpoint creation excluded), issue 6's <= 60 s goal
    mkdir -p $out; s=$(date +%s%N)
    CUDA_VISIBLE_DEVICES=$gpu accelerate launch --num_processes 1 src/train.py --recipe llama2_guanaco_fast \
      --set model.name=$M --set data.path=$GUANACO_1K --set output.dir=/tmp/epoch-run --set logging.progress_bar=false \
      > $out/epoch.log 2>&1; rc=$?
    e=$(date +%s%N); echo "{\"epoch_wall_ms\": $(( (e - s) / 1000000 )), \"rc\": $rc}" | tee $out/epoch.json
    cp /tmp/epoch-run/summary.json $out/epoch_summary.json 2>/dev/null; exit 0 ;;
esac
CUDA_VISIBLE_DEVICES=$gpu python3 bench/throughput.py --model $M --data $GUANACO_1K --out $out --steps ${STEPS:-30} \
  --warmup 5 --runs "$runs" --scratch /tmp/bench-$set 2>&1 | tail -9
