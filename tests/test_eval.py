"""Evaluation: the held-out metric's scoring on hand-written answers, prompt selection, greedy batched generation, who
generates under each layout, and eval metrics / sample texts / the metric and its prediction files in a tiny run."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from conftest import REPO, read_scalars, read_summary, run_cli, set_args, tiny_overrides

from lorafit import evaluate, metrics
from lorafit.data import Conversation, tasks
from lorafit.errors import UserError
from lorafit.recipe import load_recipe, set_value

# ---------------------------------------------------------------------------------------------------------------
# Scoring


def test_exact_match_on_hand_written_answers():
    refs = ["stone river lamp"] * 6
    answers = [
        "stone river lamp",  # exact: right
        "  Stone   River LAMP\n",  # white space and case are not the skill: right
        "stone river",  # a word missing: wrong
        "lamp river stone",  # not reversed: wrong
        "stone river lamp.",  # punctuation counts: wrong
        "",  # nothing: wrong
    ]
    # 2 right of 6, counted by hand above.
    assert metrics.mean_score("exact", answers, refs) == pytest.approx(2 / 6)
    assert metrics.mean_score("exact", ["a b"], ["a b"]) == 1.0
    assert metrics.mean_score("exact", [], []) == 0.0
    with pytest.raises(ValueError):
        metrics.mean_score("exact", ["a"], [])


@pytest.mark.parametrize("metric, answer, reference, regex, want", [
    ("exact", "2032-08-08", "2032-08-08", None, 1.0),
    ("exact", "2032-08-08 2032-08-08 20", "2032-08-08", None, 0.0),  # trailing text: not exact
    ("contains", "2032-08-08 2032-08-08 20", "2032-08-08", None, 1.0),  # ... but it contains the answer
    ("contains", "The date is 2032-08-09.", "2032-08-08", None, 0.0),
    ("contains", "", "2032-08-08", None, 0.0),  # an empty answer never scores
    ("exact", "", "", None, 0.0),
    ("regex", "so the answer is #### 42.", "six times seven #### 42", r"####\s*(-?\d+)", 1.0),  # both extracted
    ("regex", "#### 41", "#### 42", r"####\s*(-?\d+)", 0.0),
    ("regex", "I think it is 42", "42", r"(\d+)", 1.0),  # the reference has no ####: taken whole
    ("regex", "no number here", "42", r"(\d+)", 0.0),  # the pattern finds nothing in the answer
])  # fmt: skip
def test_each_metric_on_hand_checked_answers(metric, answer, reference, regex, want):
    assert metrics.score(metric, answer, reference, regex) == want


def test_reverse_words_answers_are_the_reversed_prompt_words():
    for ex in tasks.generate("reverse-words", 50, seed=3):
        words = ex.prompt.split(": ", 1)[1].split()
        assert ex.answer.split() == words[::-1]
        assert len(set(words)) == len(words)  # distinct words: the reversal is unambiguous
    assert tasks.generate("reverse-words", 20, 7) == tasks.generate("reverse-words", 20, 7)


# ---------------------------------------------------------------------------------------------------------------
# Prompt selection

CONVS = [Conversation([(f"Reverse the order of these words: w{i} x{i}", f"x{i} w{i}")]) for i in range(10)]


def _cfg(*sets):
    cfg = load_recipe("quickstart")
    for s in sets:
        k, v = s.split("=", 1)
        cfg = set_value(cfg, k, v)
    return cfg


def test_samples_default_to_the_first_held_out_prompts():
    got = evaluate.sample_prompts(_cfg("eval.samples=2"), CONVS)
    assert [p.user for p in got] == [CONVS[0].turns[0][0], CONVS[1].turns[0][0]]
    assert got[0].reference == "x0 w0"


def test_recipe_prompts_replace_the_held_out_ones():
    cfg = _cfg()
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, prompts=["Hello?", "Name a colour."]))
    got = evaluate.sample_prompts(cfg, CONVS)
    assert [(p.user, p.reference) for p in got] == [("Hello?", None), ("Name a colour.", None)]


def test_the_metric_is_exact_on_synthetic_data_by_default_and_none_elsewhere():
    assert evaluate.metric_of(_cfg()) == "exact"
    assert len(evaluate.metric_prompts(_cfg("eval.metric_rows=4"), CONVS)) == 4
    assert evaluate.metric_prompts(_cfg("eval.metric=none"), CONVS) == []
    assert evaluate.metric_of(_cfg("data.path=/data/guanaco")) is None
    assert evaluate.metric_of(_cfg("data.path=/data/guanaco", "eval.metric=contains")) == "contains"


def test_a_saved_recipe_with_the_old_skill_keys_still_loads(tmp_path):
    """recipe.yaml files of runs made before eval.metric (skill_check / skill_prompts) load in generate and merge."""
    old = _cfg().to_dict()
    old["eval"] = {k: v for k, v in old["eval"].items() if not k.startswith("metric")}
    old["eval"].update(skill_check=True, skill_prompts=7, skill_max_new_tokens=9)
    import yaml

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    got = load_recipe(str(tmp_path / "recipe.yaml"))
    assert (got.eval.metric_rows, got.eval.metric_max_new_tokens) == (7, 9)


@pytest.mark.parametrize(
    "key,value",
    [("eval.samples", "-1"), ("eval.batch_size", "0"), ("eval.max_new_tokens", "0"), ("eval.metric_rows", "0"),
     ("eval.metric", "bleu"), ("eval.regex", "(unclosed")],
)
def test_eval_config_refuses_bad_values(key, value):
    with pytest.raises(UserError, match=key):
        _cfg(f"{key}={value}")


def test_sample_markdown_keeps_line_breaks_and_shows_the_reference():
    md = evaluate.sample_markdown(evaluate.Prompt("q", None, "ref"), "line1\nline2")
    assert md == "**prompt:** q\n\n**answer:** line1  \nline2\n\n**reference:** ref"
    assert "*(empty)*" in evaluate.sample_markdown(evaluate.Prompt("q"), "")


# ---------------------------------------------------------------------------------------------------------------
# Generation


class FakeTokenizer:
    eos_token_id = 2
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


class FakeModel:
    """Records what generate() is given and continues every row with a fixed token sequence."""

    def __init__(self, continuation):
        import torch

        self.training = True
        self.continuation = continuation
        self.calls = []
        self.generation_config = None
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._p])

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
        import torch

        assert not self.training  # sampling in training mode would apply LoRA dropout
        self.calls.append((input_ids.tolist(), attention_mask.tolist(), synced_gpus))
        tail = torch.tensor([self.continuation] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)


def test_greedy_answers_left_pads_cuts_at_eos_and_restores_training_mode():
    m = FakeModel([7, 8, 2, 9, 9])  # 2 is EOS: 9 9 after it must not show
    out = evaluate.greedy_answers(m, FakeTokenizer(), [[5, 6, 7], [5], [4, 4]], max_new_tokens=5, batch_size=2)
    assert out == ["t7 t8"] * 3
    assert m.training
    (ids1, mask1, _), (ids2, mask2, _) = m.calls
    assert ids1 == [[5, 6, 7], [0, 0, 5]] and mask1 == [[1, 1, 1], [0, 0, 1]]  # left padding with pad id 0
    assert ids2 == [[4, 4]] and mask2 == [[1, 1]]


def test_greedy_answers_without_eos_keep_every_token():
    m = FakeModel([3, 4])
    assert evaluate.greedy_answers(m, FakeTokenizer(), [[1]], max_new_tokens=2) == ["t3 t4"]


def test_batched_greedy_equals_one_by_one_on_a_real_model(tiny_llama_dir):
    """Left padding with an attention mask must not change greedy answers (position ids follow the mask)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.pad_token = tok.unk_token
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager")
    prompts = [
        tok("What is the capital of France?")["input_ids"],
        tok("Is the sun a star?")["input_ids"],
        tok("Name three primary colors.")["input_ids"],
    ]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so the batch is padded
    one = [evaluate.greedy_answers(model, tok, [p], 6)[0] for p in prompts]
    batched = evaluate.greedy_answers(model, tok, prompts, 6, batch_size=3)
    assert batched == one


# ---------------------------------------------------------------------------------------------------------------
# Who generates


class RecordingWriter:
    def __init__(self):
        self.scalars, self.texts = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def flush(self):
        pass


@dataclasses.dataclass
class FakeLayout:
    kind: str
    world_size: int
    rank: int

    @property
    def is_main(self):
        return self.rank == 0


class FakeRenderer:
    def prompt_ids(self, user, system=None):
        return [1, len(user)]


class Args:
    bf16 = fp16 = False
    device = "cpu"


class State:
    global_step = 0
    log_history: list = []


@pytest.mark.parametrize(
    "kind,world,rank,generates,synced",
    [
        ("cpu", 1, 0, True, False),
        ("ddp", 2, 0, True, False),
        ("ddp", 2, 1, False, False),  # rank 1 skips: no collective inside generation outside ZeRO-3
        ("zero2", 2, 1, False, False),
        ("zero3", 2, 1, True, True),  # every rank joins every forward: the weights are sharded
        ("zero3", 2, 0, True, True),
    ],
)
def test_who_generates(monkeypatch, kind, world, rank, generates, synced):
    calls = []

    def fake_greedy(model, tok, ids, max_new_tokens, batch_size, device=None, synced_gpus=False, autocast_dtype=None,
                    progress=None):
        calls.append(synced_gpus)
        return ["x0 w0"] * len(ids)

    monkeypatch.setattr(evaluate, "greedy_answers", fake_greedy)
    writer = RecordingWriter()
    cb = evaluate.EvalCallback(
        _cfg("eval.metric_rows=3"), FakeLayout(kind, world, rank), FakeRenderer(), None, CONVS, writer
    )
    cb.on_train_begin(Args(), State(), None, model=object())
    cb.on_evaluate(Args(), State(), None, model=object(), metrics={"eval_loss": 1.5})
    assert calls == ([synced, synced] if generates else [])
    if generates:
        # The first scored prompt's reference is "x0 w0": 1 of 3 right.
        assert (("eval/exact", pytest.approx(1 / 3), 0) in writer.scalars) == (rank == 0)
        assert cb.summary().get("exact_before") == (pytest.approx(1 / 3) if rank == 0 else None)
        assert [t[0] for t in writer.texts] == ["eval/sample_0", "eval/sample_1", "eval/sample_2"]


def test_evaluated_at_reads_the_log_history():
    class S:
        log_history = [{"loss": 1.0, "step": 5}, {"eval_loss": 2.0, "step": 10}]

    assert evaluate.evaluated_at(S, 10) and not evaluate.evaluated_at(S, 5)


# ---------------------------------------------------------------------------------------------------------------
# A tiny real run

# The synthetic task with an eval split, evaluated every 2 steps with short generations: shared by the tiny runs below.
SYNTHETIC_EVAL_SETS = [
    "data.path=synthetic:reverse-words",
    "data.eval_fraction=0.25",
    "training.eval_steps=2",
    "eval.max_new_tokens=6",
    "eval.metric_max_new_tokens=6",
]


def test_tiny_run_writes_eval_metrics_samples_and_the_held_out_metric(tmp_path, tiny_llama_dir, tokenizer_dir):
    """The tiny random Llama on the synthetic task: eval at start, every 2 steps and at the end; samples as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    sets = [
        *SYNTHETIC_EVAL_SETS,
        "eval.samples=2",
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
    scalars = read_scalars(out / "tb")
    # eval_on_start at 0, eval_steps=2 -> 2 and 4; the final evaluate is not repeated at step 4.
    assert [s for s, _ in scalars["eval/loss"]] == [0, 2, 4]
    assert [s for s, _ in scalars["eval/perplexity"]] == [0, 2, 4]
    assert [s for s, _ in scalars["eval/exact"]] == [0, 4]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    for i in range(2):
        events = acc.Tensors(f"eval/sample_{i}/text_summary")  # torch add_text appends /text_summary
        assert [e.step for e in events] == [0, 2, 4]
        text = events[-1].tensor_proto.string_val[0].decode()
        assert text.startswith("**prompt:** Reverse the order of these words:") and "**reference:**" in text
    s = read_summary(out)
    losses = [v for _, v in scalars["eval/loss"]]
    assert s["eval_loss_final"] == pytest.approx(losses[-1]) and s["eval_loss_best"] == pytest.approx(min(losses))
    assert s["eval_loss_before"] == pytest.approx(losses[0])
    # eval_num_tokens: the real tokens each evaluation scored (all held-out rows), not TRL's training count
    assert [v for _, v in scalars["eval/num_tokens"]] == [s["data"]["eval_tokens"]] * 3 and s["data"]["eval_tokens"]
    assert s["metric"] == "exact" and 0.0 <= s["exact_before"] <= 1.0 and 0.0 <= s["exact_after"] <= 1.0
    assert len(s["samples"]) == 2 and s["samples"][0]["step"] == 4
    for when in ("before", "after"):  # every prediction, with a score that is the metric of its answer
        rows = [json.loads(x) for x in (out / "eval" / f"predictions-{when}.jsonl").read_text().splitlines()]
        assert len(rows) == s["data"]["eval_rows"] and all(r["reference"] for r in rows)
        assert all(r["score"] == metrics.score("exact", r["answer"], r["reference"]) for r in rows)
        assert s[f"exact_{when}"] == pytest.approx(sum(r["score"] for r in rows) / len(rows))


def test_training_after_an_evaluation_still_gets_gradients(tiny_llama_dir):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel on an eval-mode no-grad forward, and that
    kernel has no autograd: lorafit.model turns the repacking off, so LoRA in the first layer still gets gradients
    (through every later frozen 4-bit layer) after an evaluation or a generated sample."""
    import torch

    from lorafit import layout, model
    from lorafit.recipe import load_recipe

    cfg = load_recipe(
        "llama2_guanaco",
        [
            f"model.name={tiny_llama_dir}",
            "quantization.compute_dtype=float32",
            "training.gradient_checkpointing=false",
            "lora.dropout=0.0",
        ],
    )
    lay = layout.decide(cfg, env={}, cuda_available=False)
    tok = model.load_tokenizer(cfg, str(tiny_llama_dir))
    net = model.load_model(cfg, lay, str(tiny_llama_dir), tok)
    flags = [m.support_avx512bf16_for_cpu for m in net.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert flags and not any(flags)
    ids = torch.tensor([tok("Is the sun a star? Yes, the sun is a star.")["input_ids"]])
    net.eval()
    with torch.no_grad():
        net(input_ids=ids)  # what an evaluation does before training resumes
    net.train()
    for p in net.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)  # B = 0 at init would block the gradient of A; any non-zero adapter will do
    net(input_ids=ids, labels=ids).loss.backward()
    first = [p.grad for n, p in net.named_parameters() if "layers.0." in n and "lora_B" in n]
    assert first and all(g is not None and g.abs().sum() > 0 for g in first)


@pytest.mark.distributed
def test_samples_and_the_metric_under_ddp_and_zero3(tmp_path, tiny_llama_dir):
    """2 CPU processes. DDP: rank 0 generates alone. ZeRO-3: every rank joins each forward (synced_gpus), else the
    sharded weights' all-gathers would hang. Both finish, log the texts, and the base model's step-0 answer is the
    same with whole and with sharded weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sets = [
        *SYNTHETIC_EVAL_SETS,
        "eval.batch_size=3",
    ]
    step0 = {}
    for kind, env in (("ddp", {"ACCELERATE_USE_CPU": "1"}), ("zero3", {"DS_ACCELERATOR": "cpu"})):
        out = tmp_path / kind
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "launch" / f"{kind}.yaml"),
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
        ]
        r = run_cli(
            [
                "--recipe",
                "llama2_guanaco",
                *tiny_overrides(tiny_llama_dir, tiny_llama_dir, out, steps=4),
                *set_args(sets),
            ],
            env=env,
            launcher=launcher,
            timeout=900,
        )
        assert r.returncode == 0, f"{kind}:\n" + r.stdout[-3000:] + r.stderr[-3000:]
        assert [s for s, _ in read_scalars(out / "tb")["eval/exact"]] == [0, 4]
        acc = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0})
        acc.Reload()
        events = acc.Tensors("eval/sample_0/text_summary")
        assert [e.step for e in events] == [0, 2, 4]
        step0[kind] = events[0].tensor_proto.string_val[0].decode()
        assert "exact_after" in read_summary(out)
    assert step0["ddp"] == step0["zero3"]
