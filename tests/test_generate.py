"""src/generate.py: answers from a plain model folder and from a run's 4-bit base + adapter match in-process greedy
generation; chat mode keeps the conversation; mistakes exit 2 with one line. (The quickstart adapter is exercised in
tests/test_quickstart.py, which trains it once.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, read_summary, run_cli, set_args, tiny_overrides

from lorafit import data, evaluate
from lorafit.recipe import DataConfig

PROMPT = "What is the capital of France?"


def load_generate_module():
    spec = importlib.util.spec_from_file_location("lorafit_generate", REPO / "src" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def in_process_answer(model_dir, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    renderer = data.make_renderer(tok, "auto", DataConfig())  # a folder without recipe.yaml: the default format
    return evaluate.greedy_answers(model, tok, [renderer.prompt_ids(prompt)], max_new_tokens)[0]


def test_answers_a_prompt_with_a_plain_model_folder(tiny_llama_dir):
    r = run_cli(["--run", str(tiny_llama_dir), "--prompt", PROMPT, "--max-new-tokens", "8"], script="src/generate.py")
    assert r.returncode == 0, r.stderr[-3000:]
    # Greedy decoding: the streamed answer is exactly what in-process generation gives for the same weights.
    assert r.stdout.strip() == in_process_answer(tiny_llama_dir, PROMPT, 8)
    assert "lorafit:" not in r.stdout  # logs go to stderr; stdout is the answer alone


def test_chat_keeps_the_conversation_and_quits_on_an_empty_line(tiny_llama_dir):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(
        [sys.executable, str(REPO / "src" / "generate.py"), "--run", str(tiny_llama_dir), "--max-new-tokens", "4"],
        input=f"{PROMPT}\nAnd Spain?\n/reset\nIs the sun a star?\n\nnot read\n",
        capture_output=True,
        text=True,
        env=e,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("model> ") == 3  # three questions answered; the empty line ended the chat


def test_llama2_history_is_the_training_encoding_of_earlier_turns(tokenizer_dir):
    from transformers import AutoTokenizer

    gen = load_generate_module()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    r = data.Llama2Renderer(tok)
    history = [("Is the sun a star?", "Yes.")]
    ids = gen.prompt_ids(r, tok, history, "And the moon?", None)
    first = r.encode(data.Conversation(history)).input_ids
    assert ids == first + r.prompt_ids("And the moon?")
    assert ids[: len(first)][-1] == tok.eos_token_id  # the earlier answer is closed with EOS, as trained
    assert gen.prompt_ids(r, tok, [], "Hi", "Be brief.") == r.prompt_ids("Hi", "Be brief.")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--run", "/nonexistent/run"], "no such folder"),
        (["--run", "{empty}"], "holds no adapter"),
        (["--run", "{empty}", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_mistakes_exit_2_with_one_line(tmp_path, args, needle):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    r = run_cli([*args, "--prompt", "hi"], script="src/generate.py")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("lorafit: error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr[-2000:]


@pytest.mark.slow
def test_adapter_run_answers_like_the_model_did_at_its_last_eval(tmp_path, tiny_llama_dir, tokenizer_dir):
    """A 4-bit tiny run: generate.py rebuilds base + adapter from recipe.yaml; its greedy answer to a held-out prompt
    equals the sample answer the training run logged at its final evaluation (same weights, same rendering)."""
    out = tmp_path / "run"
    sets = [
        "data.path=synthetic:reverse-words",
        "data.eval_fraction=0.25",
        "eval.samples=1",
        "eval.max_new_tokens=8",
        "eval.batch_size=1",
        "eval.metric=none",
        "lora.dropout=0.0",
        "training.learning_rate=5e-3",
    ]
    r = run_cli(
        [
            "--recipe",
            "llama2_guanaco",
            *tiny_overrides(tiny_llama_dir, tokenizer_dir, out, steps=4),
            *set_args(sets),
        ]
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sample = read_summary(out)["samples"][0]
    g = run_cli(["--run", str(out), "--prompt", sample["prompt"], "--max-new-tokens", "8"], script="src/generate.py")
    assert g.returncode == 0, g.stderr[-3000:]
    assert "with the adapter from" in g.stderr
    assert g.stdout.strip() == sample["answer"], json.dumps(sample)
    base = run_cli(
        ["--run", str(out), "--base-only", "--prompt", sample["prompt"], "--max-new-tokens", "8"],
        script="src/generate.py",
    )
    assert base.returncode == 0 and "base" in base.stderr and "alone" in base.stderr, base.stderr[-3000:]
