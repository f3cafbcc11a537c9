"""Same numbers before and after a change that should not change them: the same tiny runs at two git revisions on CPU,
compared on every logged training loss, gradient norm, learning rate and eval loss, and on the adapter's bytes.

    python bench/same_numbers.py HEAD~1 HEAD            # two commits
    python bench/same_numbers.py main WORKTREE          # main against the files as they are now (uncommitted too)
    python bench/same_numbers.py main WORKTREE --ddp    # also two CPU processes over gloo (accelerate, cpu_ddp.yaml)

Exit 0 when every number and byte is equal. Each revision runs from a git worktree of its own (WORKTREE: this
checkout), in this Python environment, with its own src/ first on the path. The runs: the seed recipe (padded
batches, PEFT's layers, dropout, eval every 3 steps) and the fast path (packing, varlen attention, fused 4-bit layers,
lorafit's AdamW), each on a 2-layer random Llama built here with a fixed seed and ../shared's guanaco rows (or
tests/fixtures' rows without ../shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COMMON = ["training.max_steps=6", "training.per_device_batch_size=2", "data.max_length=512", "data.max_rows=48",
          "quantization.compute_dtype=float32", "lora.r=8", "logging.steps=1", "training.learning_rate=0.01",
          "checkpoint.every_steps=3", "checkpoint.every_minutes=0"]
RUNS = {
    "seed": ["training.optimizer=adamw_torch", "data.eval_fraction=0.2", "training.eval_steps=3"],
    "fast": ["data.packing=true", "model.attn_implementation=varlen", "lora.fused=true",
             "training.optimizer=lorafit_adamw_32bit", "training.gradient_checkpointing=false"],
}
TAGS = ("train/loss", "train/grad_norm", "train/learning_rate", "eval/loss")


def tiny_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = SHARED / "tokenizers" / "llama-2"
    if not (tok_dir / "tokenizer.model").exists():
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_fallback_tokenizer

        tok_dir = build_fallback_tokenizer(out / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         tie_word_embeddings=False))
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return out / "model"


def data_path(work: Path) -> Path:
    if (SHARED / "data" / "guanaco-llama2-1k").is_dir():
        return SHARED / "data" / "guanaco-llama2-1k"
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import FIXTURE_ROWS

    rows = work / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in FIXTURE_ROWS * 6))
    return rows


def checkout(rev: str, work: Path) -> Path:
    if rev == "WORKTREE":
        return REPO
    dest = work / f"rev-{hashlib.sha1(rev.encode()).hexdigest()[:8]}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(dest), rev], check=True,
                   capture_output=True)
    return dest


def run(tree: Path, model: Path, data: Path, out: Path, sets: list[str], ddp: bool) -> dict:
    args = ["--recipe", "llama2_guanaco"]
    for s in [f"model.name={model}", f"data.path={data}", f"output.dir={out}", *COMMON, *sets]:
        args += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1", "LORAFIT_CACHE": str(out) + "-cache",
           "PYTHONUNBUFFERED": "1"}
    if ddp:
        launcher = [shutil.which("accelerate") or "accelerate", "launch", "--config_file",
                    str(tree / "launch" / "cpu_ddp.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        launcher = [sys.executable]
    r = subprocess.run([*launcher, str(tree / "src" / "train.py"), *args], env=env, cwd=tree, capture_output=True,
                       text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in TAGS if t in acc.Tags()["scalars"]}
    adapter = hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    return {"scalars": scalars, "adapter_sha256": adapter}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--ddp", action="store_true", help="also run both on 2 CPU processes")
    p.add_argument("--out", help="write both sides' numbers to this JSON file")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorafit-same-numbers-"))
    try:
        model, data = tiny_model(work), data_path(work)
        trees = {side: checkout(rev, work) for side, rev in (("before", a.before), ("after", a.after))}
        results: dict = {}
        cases = [(name, sets, False) for name, sets in RUNS.items()]
        if a.ddp:
            cases.append(("seed-ddp2", RUNS["seed"], True))
        same = True
        for name, sets, ddp in cases:
            got = {side: run(tree, model, data, work / f"{side}-{name}", sets, ddp) for side, tree in trees.items()}
            results[name] = got
            equal = got["before"] == got["after"]
            same &= equal
            losses = [round(v, 6) for _, v in got["after"]["scalars"].get("train/loss", [])]
            print(f"{name:10s} {'identical' if equal else 'DIFFERENT'}: train/loss {losses}, adapter "
                  f"{got['after']['adapter_sha256'][:16]}")
            if not equal:
                for tag in TAGS:
                    b, c = got["before"]["scalars"].get(tag), got["after"]["scalars"].get(tag)
                    if b != c:
                        print(f"  {tag}: before {b}\n  {tag}: after  {c}")
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=1))
        return 0 if same else 1
    finally:
        for tree in (work / d for d in os.listdir(work) if d.startswith("rev-")):
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
