"""Shared test fixtures: tiny random Llama checkpoints, the Llama-2 tokenizer (or our own stand-in), guanaco rows
(or our own fixture rows), and a runner for the real CLI.

Where ../shared (the real guanaco parquet and Llama-2 tokenizer) is absent, fixtures fall back to small data and a
word-level tokenizer built here, so every test still runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORAFIT_SHARED", REPO.parent / "shared"))
# On the GPU box, .gpu/env.sh points these at the bundled copies.
GUANACO = Path(os.environ.get("GUANACO_1K", SHARED / "data" / "guanaco-llama2-1k"))
LLAMA2_TOKENIZER = Path(os.environ.get("LLAMA2_TOKENIZER", SHARED / "tokenizers" / "llama-2"))

# Our own fixture rows in guanaco's pre-rendered Llama-2 format (written for these tests, not copied from anywhere).
FIXTURE_ROWS = [
    "<s>[INST] What is the capital of France? [/INST] The capital of France is Paris. </s>",
    "<s>[INST] Name three primary colors. [/INST] Red, yellow and blue. </s>",
    "<s>[INST] Translate 'good morning' to Spanish. [/INST] Buenos días. </s>",
    "<s>[INST] How many legs does a spider have? [/INST] A spider has eight legs. </s><s>[INST] And an ant? "
    "[/INST] An ant has six legs. </s>",
    "<s>[INST] Write a haiku about rain. [/INST] Soft rain on the roof / the garden drinks in silence / "
    "puddles hold the sky </s>",
    "<s>[INST] What is 12 times 12? [/INST] 12 times 12 is 144. </s>",
    "<s>[INST] Give me a synonym for happy. [/INST] Joyful. </s>",
    "<s>[INST] Is the sun a star? [/INST] Yes, the sun is a star. </s>",
]


def has_shared() -> bool:
    return (GUANACO / "train-00000-of-00001.parquet").exists() and (LLAMA2_TOKENIZER / "tokenizer.model").exists()


def build_fallback_tokenizer(out: Path) -> Path:
    """A word-level tokenizer with Llama-2's special tokens (<unk>=0, <s>=1, </s>=2), built from our fixture rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for row in FIXTURE_ROWS + [" ".join(__import__("lorafit.data.tasks", fromlist=["WORDS"]).WORDS)]:
        for w in row.replace("<s>", " ").replace("</s>", " ").replace("[", " [ ").replace("]", " ] ").split():
            words.add(w)
    extra = list("[]/.,?!'0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:") + ["INST", "Reverse",
                                                                                               "order", "these"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in sorted(words | set(extra)):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real Llama-2 tokenizer when ../shared has it, else our word-level stand-in."""
    if has_shared():
        return LLAMA2_TOKENIZER
    return build_fallback_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def guanaco_dir(tmp_path_factory) -> Path:
    """The real guanaco-llama2-1k folder when ../shared has it, else a parquet of our fixture rows."""
    if has_shared():
        return GUANACO
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("guanaco")
    pq.write_table(pa.table({"text": FIXTURE_ROWS * 4}), d / "train-00000-of-00001.parquet")
    return d


def make_tiny_llama(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised 2-layer Llama (hidden 64) with the given tokenizer into `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


def tiny_overrides(model_dir: Path, data_dir: Path, out_dir: Path, steps: int = 3) -> list[str]:
    """Overrides that turn llama2_guanaco into a seconds-long CPU run on the tiny model."""
    sets = [f"model.name={model_dir}", f"data.path={data_dir}", f"output.dir={out_dir}",
            f"training.max_steps={steps}", "training.per_device_batch_size=2", "data.max_length=128",
            "data.max_rows=32", "quantization.compute_dtype=float32", "training.optimizer=adamw_torch",
            "lora.r=8", "logging.steps=1", "logging.progress_bar=false",
            "data.allow_truncated_answers=true"]  # seconds-long runs: guanaco's rows cut to 128 tokens on purpose
    return set_args(sets)


def set_args(sets: list[str]) -> list[str]:
    """["k=v", ...] -> ["--set", "k=v", ...], as the CLI takes them."""
    return [a for s in sets for a in ("--set", s)]


def run_cli(args: list[str], env: dict | None = None, script: str = "src/train.py", timeout: int = 600,
            launcher: list[str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run an entry script of ours in a fresh process, as a user would (from the repository, or from `cwd`)."""
    e = dict(os.environ)
    e.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    e.update(env or {})
    cmd = (launcher or [sys.executable]) + [str(REPO / script)] + args
    return subprocess.run(cmd, cwd=cwd or REPO, env=e, capture_output=True, text=True, timeout=timeout)


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from lorafit.tb import read_scalars as read  # imported here: lorafit.tb imports transformers

    return read(tb_dir)


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
