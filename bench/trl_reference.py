"""The reference: the seed fine-tune written directly against TRL, as the classic notebook does (no lorafit code).

    python bench/trl_reference.py --model /tmp/llama2-7b-random --data $GUANACO_1K --steps 40 --out /tmp/ref.json
    python bench/trl_reference.py ... --tuned        # GC off, bfd packing, flex attention: the best TRL row in issue 6
    python bench/trl_reference.py ... --tuned --liger --optim adamw_torch_fused   # what a speed-aware TRL user runs

Measures, per optimizer step after --warmup steps, real (non-pad) tokens/s with a device sync at every step end, plus
the peak allocated GPU memory; writes JSON. bench/throughput.py runs this next to lorafit in one invocation.

Two clocks per step (`StepTimer`): `real_tokens_per_s` divides a step's tokens by the wall time from the previous
step's end to its own end, which is how lorafit's own figure is taken (the time between two training logs), so the two
sides count the same work: the batch fetch, HF's loop, the logging, the step. `real_tokens_per_s_in_step` is the
clock this script used up to 2026-12-02 (on_step_begin to on_step_end only): it leaves out what happens between two
steps, which lorafit's figure never did.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, synchronized so queued GPU work is counted in the step that issued it: from its
    own begin (`times`) and from the previous step's end (`cycles`; None for the first step)."""

    def __init__(self):
        self.times: list[float] = []
        self.cycles: list[float | None] = []
        self._t = self._end = None

    def on_step_begin(self, args, state, control, **kw):
        torch.cuda.synchronize()  # host-device sync: start the clock with an empty queue
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()  # host-device sync
        now = time.perf_counter()
        self.times.append(now - self._t)
        self.cycles.append(None if self._end is None else now - self._end)
        self._end = now


def step_rates(counts: list[int], seconds: list[float | None], warmup: int, steps: int) -> list[float]:
    """Real tokens/s of steps warmup .. steps-1: step i consumed counts[i] tokens (the dataloader may have prefetched
    more) in seconds[i]."""
    return [c / t for c, t in zip(counts[warmup:steps], seconds[warmup:steps]) if t]


class CountingCollator:
    def __init__(self, inner, counts):
        self.inner, self.counts = inner, counts

    def __call__(self, examples):
        self.counts.append(sum(len(e["input_ids"]) for e in examples))
        return self.inner(examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model's); bench/throughput.py --shape passes the "
                   "Llama-2 one, which a Qwen2 model folder would load as another class")
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tuned", action="store_true")
    p.add_argument("--liger", action="store_true", help="TRL's use_liger_kernel=True (Liger's RMSNorm/SwiGLU/RoPE)")
    p.add_argument("--optim", default="paged_adamw_32bit", help="TRL's optim (e.g. adamw_torch_fused)")
    p.add_argument("--all-linear", action="store_true")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(a.tokenizer or a.model)
    tok.pad_token = tok.unk_token  # the notebook's choice: pad distinct from EOS
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                             bnb_4bit_use_double_quant=False)
    model = AutoModelForCausalLM.from_pretrained(
        a.model, quantization_config=bnb, device_map={"": 0}, dtype=torch.bfloat16,
        attn_implementation="flex_attention" if a.tuned else "sdpa")
    model.config.use_cache = False
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=a.dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules="all-linear" if a.all_linear else None)
    ds = load_dataset("parquet", data_dir=a.data, split="train")
    args = SFTConfig(output_dir="/tmp/trl-ref", max_steps=a.steps, per_device_train_batch_size=4,
                     gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03,
                     max_grad_norm=0.3, weight_decay=0.001, optim=a.optim, bf16=True, logging_steps=1,
                     use_liger_kernel=a.liger,
                     report_to="none", save_strategy="no", max_length=1024, dataset_text_field="text",
                     gradient_checkpointing=not a.tuned, packing=a.tuned,
                     packing_strategy="bfd", seed=42, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    counts: list[int] = []
    trainer.data_collator = CountingCollator(trainer.data_collator, counts)
    timer = StepTimer()
    trainer.add_callback(timer)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    # The dataloader may prefetch; step i consumed counts[i] (no gradient accumulation here).
    warm = max(a.warmup, 1)  # the first step has no cycle
    per_step = step_rates(counts, timer.cycles, warm, a.steps)
    in_step = step_rates(counts, timer.times, warm, a.steps)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res = {
        "name": ("trl_liger" if a.liger else "trl_tuned" if a.tuned else "trl_seed")
        + ("_all_linear" if a.all_linear else ""),
        "optim": a.optim,
        "real_tokens_per_s": statistics.median(per_step),
        "real_tokens_per_s_in_step": statistics.median(in_step),
        "s_per_step": statistics.median(timer.cycles[warm:]),
        "s_per_step_in_step": statistics.median(timer.times[warm:]),
        "step_times_s": [round(t, 4) for t in timer.cycles[1:]],
        "tokens_per_step": statistics.mean(counts[a.warmup:a.steps]),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_losses": losses[:10],
        "steps": a.steps,
        "gpu": torch.cuda.get_device_name(0),
    }
    print(json.dumps(res))
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
