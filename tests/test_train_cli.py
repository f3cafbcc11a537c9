"""The real CLI trains a tiny random Llama through the llama2_guanaco recipe (local overrides, a few CPU steps) and
writes what a run promises: adapter, tokenizer, recipe.yaml, summary.json and TensorBoard events."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import read_scalars, read_summary, run_cli, tiny_overrides

from lorafit.recipe import from_dict, load_recipe

STEPS = 3
TAGS = ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/epoch")


def train(model_dir: Path, data_dir: Path, out: Path, *extra: str):
    args = ["--recipe", "llama2_guanaco", *tiny_overrides(model_dir, data_dir, out, steps=STEPS), *extra]
    r = run_cli(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return read_scalars(run_dir / "tb")["train/loss"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_llama_dir, guanaco_dir) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    train(tiny_llama_dir, guanaco_dir, out)
    return out


def test_run_folder_holds_adapter_tokenizer_recipe_and_summary(first_run, tiny_llama_dir):
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "recipe.yaml"):
        assert (first_run / name).is_file(), name
    summary = read_summary(first_run)
    assert summary["recipe"] == "llama2_guanaco" and summary["steps"] == STEPS
    assert math.isfinite(summary["final_loss"]) and summary["tokens_seen"] > 0 and summary["wall_time_s"] > 0
    # data.max_rows=32 rows (less any whose prompt alone fills max_length=128), batch 2: 3 steps see 6 rows of at
    # most 128 real tokens and at least 11 (BOS, "[INST]" = 3 tokens, a question word, "[/INST]" = 4, an answer
    # word, EOS, in either tokenizer).
    d = summary["data"]
    assert d["rows"] == 32 and d["train_rows"] + d["dropped_fully_truncated"] == 32
    assert 6 * 11 <= summary["tokens_seen"] <= 6 * 128
    # where the run's time went, from the process start; the training phase is the summary's wall time
    phases = summary["phases_s"]
    assert list(phases) == ["start-up", "data", "model", "trainer", "train", "save"]
    assert all(v >= 0 for v in phases.values()) and phases["start-up"] > 0.5  # importing torch alone takes longer
    assert abs(phases["train"] - summary["wall_time_s"]) < 0.5
    st = summary["logged_step_times_s"]  # one per timed training log (tiny runs log every step)
    assert 0 < len(st) <= STEPS and all(0 < t < summary["wall_time_s"] for t in st)
    cfg = json.loads((first_run / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_adapter_loads_on_the_tiny_base_and_changes_it(first_run, tiny_llama_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, first_run)
        after = tuned(ids).logits
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 2  # q_proj and v_proj in each of 2 layers
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero; training must have moved it"
    assert not torch.equal(before, after)


def test_tensorboard_has_the_tags_and_the_recipe(first_run):
    scalars = read_scalars(first_run / "tb")
    for tag in TAGS:
        assert tag in scalars, sorted(scalars)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))  # logging.steps=1
    assert all(v > 0 for _, v in scalars["train/tokens_per_second"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(first_run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("recipe")]
    assert texts, acc.Tags()
    text = acc.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
    assert "name: llama2_guanaco" in text and "r: 8" in text


def test_same_seed_same_losses(first_run, tmp_path, tiny_llama_dir, guanaco_dir):
    again = tmp_path / "again"
    train(tiny_llama_dir, guanaco_dir, again)
    assert losses(again) == losses(first_run)  # bit-identical on CPU: same init, data order and dropout masks


def test_other_seed_other_losses(first_run, tmp_path, tiny_llama_dir, guanaco_dir):
    other = tmp_path / "other"
    train(tiny_llama_dir, guanaco_dir, other, "--set", "training.seed=7")
    assert [v for _, v in losses(other)] != [v for _, v in losses(first_run)]


def split_print_config(stdout: str) -> tuple[str, str]:
    lines = stdout.splitlines()
    k = next(i for i, line in enumerate(lines) if line.startswith("# layout "))
    return "\n".join(lines[:k]) + "\n", lines[k]


def test_print_config_prints_recipe_and_layout_and_creates_nothing(tmp_path, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_llama_dir, guanaco_dir, out)
    r = run_cli(["--recipe", "llama2_guanaco", *overrides, "--print-config"])
    assert r.returncode == 0, r.stderr[-3000:]
    text, layout = split_print_config(r.stdout)
    expected = load_recipe("llama2_guanaco", [s for s in overrides if s != "--set"])
    assert from_dict(yaml.safe_load(text), "stdout") == expected
    assert layout.startswith("# layout single") or layout.startswith("# layout cpu"), layout
    assert "device cpu" in layout and "effective batch 2" in layout
    assert not out.exists() and not list(tmp_path.iterdir())


def test_print_config_stdout_is_only_the_recipe_when_the_hub_is_unreachable():
    """The seed recipe names hub ids; with no hub to reach, lorafit says it works offline, on stderr: stdout stays the
    YAML a user saves with `> recipe.yaml` (the recipe, then the layout comment)."""
    r = run_cli(["--recipe", "llama2_guanaco", "--print-config"],
                env={"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                     "HF_ENDPOINT": "http://127.0.0.1:9", "HTTPS_PROXY": "", "https_proxy": "", "ALL_PROXY": "",
                     "all_proxy": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not reachable" in r.stderr and "not reachable" not in r.stdout
    text, layout = split_print_config(r.stdout)
    assert from_dict(yaml.safe_load(text), "stdout") == load_recipe("llama2_guanaco")
    assert r.stdout == text + layout + "\n"


def test_saved_recipe_yaml_round_trips(first_run):
    saved = first_run / "recipe.yaml"
    r = run_cli(["--recipe", str(saved), "--print-config"])
    assert r.returncode == 0, r.stderr[-3000:]
    text, _ = split_print_config(r.stdout)
    assert text == saved.read_text()


def test_stopwatch_counts_from_the_process_start():
    import time

    from lorafit import cli

    start = cli.process_start_time()
    assert time.time() - 24 * 3600 < start < time.time()  # this pytest process started earlier, not a day ago
    clock = cli.Stopwatch()
    clock.lap("so far")
    time.sleep(0.05)
    clock.lap("sleep")
    # pytest and torch were imported before this test ran: the first lap counts that time, from the process start
    assert clock.laps["so far"] > 0.5 and clock.laps["sleep"] >= 0.04
    assert clock.describe().endswith(f"total {clock.laps['so far'] + clock.laps['sleep']:.1f} s")


def test_plan_prints_the_estimate_and_the_layouts_choices(tmp_path, tiny_llama_dir):
    """--plan reads the config only: an estimate per checkpointing mode, the choice, what the layout decided for the
    4-bit layers, and no run folder."""
    out = tmp_path / "run"
    r = run_cli(["--recipe", "llama2_guanaco_fast", "--plan", "--set", f"model.name={tiny_llama_dir}",
                 "--set", f"output.dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plan for llama2_guanaco_fast: 2 layers x 64 hidden" in r.stdout
    assert "chosen: gradient checkpointing off" in r.stdout
    assert "4-bit layers: fused with their adapters (lora.fused)" in r.stdout
    assert not out.exists()
