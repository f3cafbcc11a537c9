"""A user's mistake through the real CLI: exit code 2, one line `lorafit: error: ...` on stderr naming the file, row,
column or key, no traceback, and no run folder left behind. Each case is a fresh `python src/train.py` process."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_summary, run_cli, tiny_overrides

FIXTURES = Path(__file__).parent / "fixtures"
BAD = FIXTURES / "bad"


def assert_user_error(r, run_dir: Path | None, *parts: str) -> str:
    """Exit 2, exactly one stderr line and it is ours, naming every part; no traceback; no run folder."""
    lines = r.stderr.splitlines()  # nothing else: no library warnings either
    assert r.returncode == 2, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: "), r.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    if run_dir is not None:
        assert not run_dir.exists(), f"{run_dir} left behind: {sorted(p.name for p in run_dir.iterdir())}"
    return lines[0]


def train_args(model_dir: Path, data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["--recipe", "llama2_guanaco", *tiny_overrides(model_dir, Path(data), out), *extra]


# file (or a name for a missing one): what the message must name
DATA_CASES = {
    "missing.jsonl": ("data.path", "missing.jsonl does not exist"),
    "empty.jsonl": ("empty.jsonl has no rows",),
    "missing_column.jsonl": ("missing_column.jsonl", "cannot tell the format from columns ['answer', 'prompt']",
                             "set data.format"),
    "non_string.jsonl": ("non_string.jsonl line 3", "column 'text' is list, not text"),
    "empty_text.jsonl": ("empty_text.jsonl line 2", "column 'text' is empty"),
    "unparseable.jsonl": ("unparseable.jsonl line 4 is not valid JSON", "data.bad_rows=skip"),
    "no_answer.jsonl": ("no_answer.jsonl line 3", "has no answer after [/INST]", "data.completion_only=false"),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data(tmp_path, tiny_llama_dir, name):
    out = tmp_path / "run"
    r = run_cli(train_args(tiny_llama_dir, BAD / name, out))
    assert_user_error(r, out, *DATA_CASES[name])


def test_a_format_set_by_hand_names_the_columns_it_needs(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    r = run_cli(train_args(tiny_llama_dir, BAD / "missing_column.jsonl", out, "--set", "data.format=llama2"))
    assert_user_error(r, out, "missing_column.jsonl", "format 'llama2' needs column(s) ['text']",
                      "found ['answer', 'prompt']")


def test_bad_rows_skip_trains_and_counts(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    r = run_cli(train_args(tiny_llama_dir, BAD / "mixed.jsonl", out, "--set", "data.bad_rows=skip"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = read_summary(out)["data"]
    # mixed.jsonl has 12 lines: 5 bad (one of each class above that is a row's fault), 7 good.
    assert (data["rows"], data["skipped_rows"], data["train_rows"]) == (12, 5, 7)
    assert "5 skipped" in r.stdout and "mixed.jsonl line 2 is not valid JSON" in r.stdout


@pytest.mark.parametrize(
    "extra, parts",
    [
        (["--set", "training.lr=1e-4"], ("unknown recipe key 'training.lr'", "'training.learning_rate'")),
        (["--set", "lora.r=sixteen"], ("recipe key 'lora.r' expects int, got 'sixteen'",)),
        (["--set", "lora.r=0"], ("recipe key 'lora.r' = 0: must be a positive integer",)),
    ],
)  # fmt: skip
def test_bad_overrides(tmp_path, extra, parts):
    out = tmp_path / "run"
    r = run_cli(["--recipe", "llama2_guanaco", "--set", f"output.dir={out}", *extra])
    assert_user_error(r, out, *parts)


def test_unknown_recipe(tmp_path):
    r = run_cli(["--recipe", "llama2_guanco"])
    assert_user_error(r, None, "unknown recipe 'llama2_guanco'", "did you mean llama2_guanaco")


def test_an_existing_run_folder_is_kept(tmp_path, tiny_llama_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_cli(train_args(tiny_llama_dir, BAD / "empty_text.jsonl", out))
    assert_user_error(r, None, "empty_text.jsonl line 2")
    assert (out / "notes.txt").read_text() == "mine"  # only a folder this run created is removed


def test_missing_model_path(tmp_path, guanaco_dir):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-model"
    r = run_cli(train_args(missing, guanaco_dir, out))
    assert_user_error(r, out, f"model.name={missing} does not exist")


def test_a_model_folder_without_config(tmp_path, guanaco_dir):
    out = tmp_path / "run"
    (tmp_path / "empty-model").mkdir()
    r = run_cli(train_args(tmp_path / "empty-model", guanaco_dir, out))
    assert_user_error(r, out, "has no config.json")


def test_unknown_optimizer_is_a_user_error(tmp_path):
    out = tmp_path / "run"
    r = run_cli(["--set", "training.optimizer=adamw_foo", "--set", f"output.dir={out}"])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("lorafit: error: training.optimizer='adamw_foo' is not an optimizer transformers "
                                "knows; did you mean adamw_torch, adamw_8bit, adalomo?")
    assert not out.exists()


def test_plan_of_an_unreachable_hub_model_is_a_user_error(tmp_path):
    """--plan reads the model's config.json before anything loads; offline, a hub id that is not in the local hub
    cache is one line, not transformers' traceback."""
    r = run_cli(["--recipe", "llama2_guanaco_fast", "--plan", "--set", "model.name=lorafit-tests/not-cached-7b"],
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_user_error(r, None, "could not read the config of model 'lorafit-tests/not-cached-7b'",
                      "--set model.name=PATH")
