"""A user's own data, end to end: an alpaca file with a rule-based skill trains through the CLI with its format
detected, the held-out metric scores it and writes every prediction, truncation is warned about or refused with its
numbers, and the exported tokenizer's chat template renders the exact prompt the run trained on."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import read_summary, run_cli, set_args, tiny_overrides

from lorafit import metrics
from lorafit.data import Conversation, Llama2Renderer


def plus_one_rows(n: int, seed: int = 0) -> list[dict]:
    """A rule-based skill: 'Add one to 41.' -> '#### 42' (the regex metric extracts the number)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(0, 999)
        out.append({"instruction": f"Add one to {k}.", "input": "", "output": f"#### {k + 1}"})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def quickstart_on(model_dir: Path, data: Path, out: Path, *sets: str, steps: int = 2):
    """The quickstart recipe as a user points it at their own model and data (no data.format)."""
    base = [f"model.name={model_dir}", "model.gguf_file=none", f"data.path={data}", f"output.dir={out}",
            f"training.max_steps={steps}", "logging.progress_bar=false", "training.per_device_batch_size=4"]
    return run_cli(["--recipe", "quickstart", *set_args(base + list(sets))])


@pytest.mark.slow
def test_the_quickstart_recipe_trains_on_an_alpaca_file_and_scores_it(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "plus_one.jsonl", plus_one_rows(60))
    out = tmp_path / "run"
    r = quickstart_on(tiny_llama_dir, data, out, "data.eval_fraction=0.2", "eval.metric=regex",
                      r"eval.regex=####\s*(\d+)", "eval.metric_rows=8", "eval.metric_max_new_tokens=4",
                      "training.eval_steps=1", "eval.metric_at_eval_steps=true")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = read_summary(out)
    assert s["data"]["format"] == "alpaca" and s["metric"] == "regex"
    held = [json.loads(x) for x in (out / "eval" / "predictions-before.jsonl").read_text().splitlines()]
    assert len(held) == 8 and all(h["reference"].startswith("#### ") for h in held)
    for when in ("before", "step-1", "after"):
        rows = [json.loads(x) for x in (out / "eval" / f"predictions-{when}.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [h["prompt"] for h in held]  # the same held-out prompts each time
        assert all(r["score"] == metrics.score("regex", r["answer"], r["reference"], r"####\s*(\d+)") for r in rows)
    after = [json.loads(x) for x in (out / "eval" / "predictions-after.jsonl").read_text().splitlines()]
    assert s["regex_after"] == pytest.approx(sum(r["score"] for r in after) / 8)


def _longest(tokenizer_dir: Path, rows: list[dict]) -> int:
    """The longest rendered row, counted with the renderer training uses (the reference for the messages)."""
    from transformers import AutoTokenizer

    r = Llama2Renderer(AutoTokenizer.from_pretrained(tokenizer_dir))
    return max(len(r.encode(Conversation([(x["instruction"], x["output"])])).input_ids) for x in rows)


def test_truncated_answers_are_warned_about_with_their_numbers(tmp_path, tiny_llama_dir):
    rows = plus_one_rows(20)
    rows[3]["output"] = "#### " + " ".join(["long"] * 80)  # one answer that no longer fits
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    r = run_cli(["--recipe", "llama2_guanaco", *tiny_overrides(tiny_llama_dir, data, tmp_path / "run", steps=1),
                 *set_args(["data.max_length=48", "data.allow_truncated_answers=false"])])
    assert r.returncode == 0, r.stderr[-3000:]
    longest = _longest(tiny_llama_dir, rows)
    fits = -(-longest // 64) * 64
    assert (f"data: 1 of 20 rows are longer than data.max_length=48 (the longest has {longest} tokens) and 1 lose "
            f"the end of their answer; data.max_length={fits} would fit every row") in r.stdout


def test_every_answer_cut_is_refused_with_its_numbers(tmp_path, tiny_llama_dir):
    rows = [{"instruction": f"Say it {i}.", "input": "", "output": " ".join(["word"] * 40)} for i in range(10)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "run"
    r = run_cli(["--recipe", "llama2_guanaco", *tiny_overrides(tiny_llama_dir, data, out, steps=1),
                 *set_args(["data.max_length=24", "data.allow_truncated_answers=false"])])
    longest = _longest(tiny_llama_dir, rows)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert (f"every one of the 10 rows is longer than data.max_length=24 and loses the end of its answer (the "
            f"longest has {longest} tokens)") in r.stderr
    assert f"set data.max_length={-(-longest // 64) * 64} to fit them, or data.allow_truncated_answers=true" in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_the_merged_export_renders_the_training_prompt(tmp_path, tiny_llama_dir, guanaco_dir):
    """The run's tokenizer, saved with its adapter and with the merged export, carries the chat template of the
    format it trained on: plain apply_chat_template gives the ids the run trained with, system prompt included."""
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    r = run_cli(["--recipe", "llama2_guanaco", *tiny_overrides(tiny_llama_dir, guanaco_dir, out, steps=1)])
    assert r.returncode == 0, r.stderr[-3000:]
    g = run_cli(["--run", str(out), "--out", str(tmp_path / "merged"), "--dtype", "float32"], script="src/merge.py")
    assert g.returncode == 0, g.stderr[-3000:]
    renderer = Llama2Renderer(AutoTokenizer.from_pretrained(tiny_llama_dir))
    conv = Conversation([("What is the capital of France?", "Paris."), ("And of Spain?", "Madrid.")], "Be brief.")
    msgs = [{"role": "system", "content": "Be brief."}]
    for u, a in conv.turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    for folder in (out, tmp_path / "merged"):
        tok = AutoTokenizer.from_pretrained(folder)
        prompt = tok.apply_chat_template(msgs[:2], tokenize=True, add_generation_prompt=True)
        assert list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt) == renderer.prompt_ids(
            conv.turns[0][0], "Be brief.")
        whole = tok.apply_chat_template(msgs, tokenize=True)
        assert list(whole["input_ids"] if hasattr(whole, "keys") else whole) == renderer.encode(conv).input_ids
        text = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
        assert text.endswith("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST]")
