#!/usr/bin/env bash
# GPU call G (4 H100s, ~6 min; after the SmolLM2 GGUF pieces were copied to /tmp/smol by two short calls):
#   GPUs 0,1: the DDP checkpoint round trip again (the stop signal never arrived in call E), then the GPU test tier
#   GPU 2:    SmolLM2-135M on guanaco for a full epoch (call E's run was cut by its timeout at step 201 of 225)
#   GPU 3:    the fast path's loss parity at dropout 0 (cut in call E), then lean with and without activation offload
# run: . .gpu/env.sh; bash bench/gpu_call_g.sh      (results packed into $OUT/g.tgz)
set -uo pipefail
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/tmp/res-g; mkdir -p $R; M=/tmp/llama2-7b-random; export MODEL=$M
G=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
grep -E "SigBlk|SigIgn" /proc/self/status | tee $R/sigmask.txt
timeout 5 grep -E "SigBlk" /proc/self/status | sed 's/^/under timeout: /' | tee -a $R/sigmask.txt
( export CUDA_VISIBLE_DEVICES=2
  timeout 400 bash bench/smollm2_guanaco.sh $G $R/smol; say "smollm2 done" ) > $R/lane2.log 2>&1 &
[ -f $M/config.json ] || python3 bench/make_checkpoint.py --shape 7b --tokenizer $LLAMA2_TOKENIZER --out $M 2>&1 | tail -1
( export CUDA_VISIBLE_DEVICES=0,1 LORAFIT_BENCH_PORT=29641
  timeout 220 bash bench/ckpt_roundtrip.sh $R/ckpt ddp; say "round trip done"
  CUDA_VISIBLE_DEVICES=0 timeout 100 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
  timeout 40 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -k paged; say "gpu tests done"
) > $R/lane01.log 2>&1 &
( export CUDA_VISIBLE_DEVICES=3
  timeout 170 python3 bench/loss_parity.py --model $G --data $GUANACO_1K --out $R/loss_parity --steps 50 --dropouts 0
  say "loss parity done"
  timeout 170 python3 bench/throughput.py --model $M --data $GUANACO_1K --out $R/i6g --steps 30 --warmup 5 \
    --scratch /tmp/bench-g --runs "lorafit:llama2_guanaco_lean,lorafit:llama2_guanaco_lean+training.activation_offloading=true" 2>&1 | tail -4
) > $R/lane3.log 2>&1 &
wait
say "lanes done"
tail -5 $R/lane01.log; tail -3 $R/lane2.log; tail -4 $R/lane3.log
python3 -c "import json;d=json.load(open('$R/ckpt/ckpt_roundtrip_ddp.json'));print(d['launch_exit_codes'],d['status_after_stop'].get('exit_code'),d['status_final'].get('state'),d.get('saves'),d.get('resume'),d.get('errors'))"
tar czf $OUT/g.tgz -C /tmp res-g; ls -la $OUT
