"""Llama-3, Qwen2.5 and Mistral as first-class recipes: tiny random models of each architecture (GQA; Qwen2's q/k/v
biases; Mistral's sliding window) train through the CLI with the family's recipe and its fast variant, with a chat
template of the family's shape, answer masks from that template, a pad token distinct from EOS, and the fast path
engaged (or a line saying why not); under several processes in every layout that applies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import read_summary, run_cli, set_args

from lorafit.data import Conversation, TemplateRenderer

# Templates of each family's shape, written here for the tests (the real ones ship with each tokenizer): a header
# per role, the answer, an end-of-turn marker; Mistral's wraps the user turn in [INST] ... [/INST].
TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "qwen2": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
                "{% elif m['role'] == 'assistant' %}{{ ' ' ~ (m['content'] | trim) ~ eos_token }}{% endif %}"
                "{% endfor %}"),
}
RECIPES = {"llama3": "llama3_8b", "qwen2": "qwen2_5_7b", "mistral": "mistral_7b"}


def make_family(out: Path, tokenizer_dir: Path, family: str) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = TEMPLATES[family]
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    extra = {"llama3": ("llama", dict(rope_theta=500000.0)),
             "qwen2": ("qwen2", dict(use_sliding_window=False)),  # q/k/v with biases
             "mistral": ("mistral", dict(sliding_window=32))}  # a window shorter than the rows: it cuts
    model_type, fields = extra[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **common, **fields))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def family(request, tmp_path_factory, tokenizer_dir):
    return request.param, make_family(tmp_path_factory.mktemp(request.param), tokenizer_dir, request.param)


def overrides(model_dir: Path, data_dir: Path, out: Path) -> list[str]:
    return set_args([f"model.name={model_dir}", f"data.path={data_dir}", f"output.dir={out}",
                     "training.max_steps=3", "training.per_device_batch_size=2", "data.max_length=96",
                     "data.max_rows=32", "quantization.compute_dtype=float32", "lora.r=8", "logging.steps=1",
                     "logging.progress_bar=false", "data.allow_truncated_answers=true",
                     "training.dataloader_num_workers=0"])


def test_answers_are_masked_by_the_family_template(family):
    """The answer tokens (and the end of turn, which the model must learn to say) carry loss; the headers and the
    prompt do not: what TemplateRenderer marks, checked against the template's own text."""
    from transformers import AutoTokenizer

    name, model_dir = family
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = TemplateRenderer(tok).encode(Conversation([("What is 2 plus 2?", "It is 4.")]))
    answer = [t for t, m in zip(enc.input_ids, enc.completion_mask) if m]
    assert answer[-1] == tok.eos_token_id
    # the answer's own tokens, as this tokenizer spells them (the real Llama-2 tokenizer: "It is 4."; the word-level
    # stand-in without ../shared: "<unk> is 4 ."): one token more or less in the mask would change the text
    assert tok.decode(answer[:-1]).strip() == tok.decode(tok("It is 4.", add_special_tokens=False).input_ids).strip()
    prompt = tok.decode([t for t, m in zip(enc.input_ids, enc.completion_mask) if not m])
    spelled = lambda text: tok.decode(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    assert spelled("What is 2 plus 2?") in prompt and spelled("It is 4.") not in prompt


@pytest.mark.slow
@pytest.mark.parametrize("fast", [False, True])
def test_the_family_recipe_trains_through_the_cli(tmp_path, family, guanaco_dir, fast):
    name, model_dir = family
    recipe = RECIPES[name] + ("_fast" if fast else "")
    out = tmp_path / "run"
    extra = set_args(["training.optimizer=adamw_torch"]) if not fast else []  # the fast path keeps its own AdamW
    r = run_cli(["--recipe", recipe, *overrides(model_dir, guanaco_dir, out), *extra])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = read_summary(out)
    assert s["steps"] == 3 and s["data"]["renderer"] == "tokenizer" and s["data"]["format"] == "llama2"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template == TEMPLATES[name]
    if fast:
        # the fast path engaged: every 4-bit linear fused, varlen attention, packed rows
        assert s["fused_4bit_layers"] == {"lora": 4, "frozen": 14}  # as tests/test_distributed.py counts them
        assert "lorafit_varlen" in r.stdout and "packing" not in r.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("config", ["ddp.yaml", "zero3.yaml", "fsdp2.yaml"])
def test_the_fast_recipe_trains_in_every_layout(tmp_path, family, guanaco_dir, config):
    from conftest import REPO

    name, model_dir = family
    env = {"ddp.yaml": {"ACCELERATE_USE_CPU": "1"}, "zero3.yaml": {"DS_ACCELERATOR": "cpu"}}.get(config, {})
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
                "--num_processes", "2", "--mixed_precision", "no"]
    out = tmp_path / "run"
    r = run_cli(["--recipe", RECIPES[name] + "_fast", *overrides(model_dir, guanaco_dir, out)],
                env={**env, "OMP_NUM_THREADS": "1"}, launcher=launcher, timeout=900)
    assert r.returncode == 0, f"{name} {config}:\n" + r.stdout[-3000:] + r.stderr[-3000:]
    s = read_summary(out)
    assert (s["world_size"], s["steps"]) == (2, 3)
    if config in ("zero3.yaml", "fsdp2.yaml"):  # the sharded layouts keep PEFT's layers, and say so on the layout line
        assert s["fused_4bit_layers"] == {"lora": 0, "frozen": 0} and "lora.fused off under" in r.stdout
    else:
        assert s["fused_4bit_layers"] == {"lora": 4, "frozen": 14}
