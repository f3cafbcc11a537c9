"""A hostile pass over the CLI: bad data, bad values, bad paths and injected faults, each as a careful user would meet
it. Every case asserts the exit code, that the output is one line naming the file, row, key or value and the fix,
and the state of the run folder afterwards: absent, untouched byte for byte, or exactly what docs/checkpoints.md
promises. The fast cases stop before any model loads; the slow ones train the tiny Llama of conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_summary, run_cli, set_args, tiny_overrides

from lorafit.run import commit as ck
from lorafit.run import status as run_status

GOOD = "<s>[INST] What is {n} plus {n}? [/INST] It is {m}. </s>"


def rows(n: int = 24) -> list[str]:
    return [GOOD.format(n=i, m=2 * i) for i in range(n)]


def write_jsonl(path: Path, texts: list[str], extra_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps({"text": t}) for t in texts]
    for at, line in sorted((extra_lines or {}).items()):
        lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def one_line(r: subprocess.CompletedProcess, code: int, *parts: str) -> str:
    """Exit `code`, exactly one stderr line and it is ours, naming every part; no traceback anywhere."""
    lines = r.stderr.splitlines()
    assert r.returncode == code, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: "), r.stderr
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with its sha256: a folder that is 'untouched' keeps this."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train(model_dir: Path, data: Path | str, out: Path | str, *sets: str, steps: int = 3, env=None, cwd=None,
          resume: str | None = None) -> subprocess.CompletedProcess:
    args = ["--recipe", "llama2_guanaco", *tiny_overrides(model_dir, Path(data), Path(out), steps=steps),
            *set_args(list(sets))]
    if resume:
        args += ["--resume", resume]
    return run_cli(args, env=env, cwd=cwd)


# ----------------------------------------------------------------------------------------------------------------
# Bad values: refused before anything loads (the recipe is checked first), no run folder


@pytest.mark.parametrize("setting, parts", [
    ("training.learning_rate=inf", ("'training.learning_rate' = inf", "finite")),
    ("training.learning_rate=nan", ("'training.learning_rate' = nan", "finite")),
    ("training.learning_rate=1e39", ("'training.learning_rate' = 1e+39", "must be in (0, 1]")),
    ("training.weight_decay=nan", ("'training.weight_decay' = nan", "finite")),
    ("training.weight_decay=-0.1", ("'training.weight_decay' = -0.1", "must be >= 0")),
    ("training.epochs=inf", ("'training.epochs' = inf", "finite")),
    ("training.seed=-1", ("'training.seed' = -1", "must be in [0, 4294967295]")),
    ("training.dataloader_num_workers=-1", ("'training.dataloader_num_workers' = -1", "must be >= 0")),
    ("training.max_grad_norm=inf", ("'training.max_grad_norm' = inf", "finite")),
    ("checkpoint.every_minutes=inf", ("'checkpoint.every_minutes' = inf", "finite")),
    ("lora.dropout=nan", ("'lora.dropout' = nan", "finite")),
    ("data.eval_max_rows=0", ("'data.eval_max_rows' = 0", "must be positive")),
    ("output.dir=", ("'output.dir' = ''", "unset shell variable")),
])  # fmt: skip
def test_a_bad_value_is_one_line_before_anything_is_written(tmp_path, setting, parts):
    out = tmp_path / "run"
    r = run_cli(["--recipe", "llama2_guanaco", "--set", f"output.dir={out}", "--set", setting])
    one_line(r, 2, *parts)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Bad paths for output.dir: refused before anything is read or written


def test_output_dir_that_is_the_current_folder_is_refused_and_its_readme_kept(tmp_path, tiny_llama_dir):
    here = tmp_path / "project"
    here.mkdir()
    (here / "README.md").write_text("mine\n")
    data = write_jsonl(tmp_path / "rows.jsonl", rows())
    for out in (".", str(here), ".."):
        r = train(tiny_llama_dir, data, out, cwd=here)
        one_line(r, 2, f"output.dir={out}", "give the run a folder of its own")
    assert snapshot(here) == {"README.md": hashlib.sha256(b"mine\n").hexdigest()}


@pytest.mark.parametrize("where", ["model folder", "inside the model folder", "inside the data folder"])
def test_output_dir_among_the_inputs_is_refused_and_they_are_untouched(tmp_path, tiny_llama_dir, guanaco_dir, where):
    out = {"model folder": tiny_llama_dir, "inside the model folder": tiny_llama_dir / "run",
           "inside the data folder": guanaco_dir / "run"}[where]
    key = "data.path" if "data" in where else "model.name"
    before = snapshot(tiny_llama_dir), snapshot(guanaco_dir)
    r = train(tiny_llama_dir, guanaco_dir, out)
    one_line(r, 2, f"output.dir={out}", f"inside {key}'s folder", "give the run a folder of its own")
    assert (snapshot(tiny_llama_dir), snapshot(guanaco_dir)) == before
    assert where == "model folder" or not out.exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "run"
    out.write_text("a file\n")
    one_line(train(tiny_llama_dir, guanaco_dir, out), 2, f"output.dir={out} is a file")
    assert out.read_text() == "a file\n"


def test_output_dir_holding_someone_elses_files_is_refused(tmp_path, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    (out / "todo.txt").write_text("x\n")
    before = snapshot(out)
    one_line(train(tiny_llama_dir, guanaco_dir, out), 2, "is not a lorafit run folder", "README.md")
    assert snapshot(out) == before


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("options, parts", [
    ("size=4m,ro", ("cannot write in", "Read-only file system", "writable file system")),
    ("size=1m", ("MiB free on its file system", "a checkpoint and the final adapter need about", "--plan")),
])  # fmt: skip
def test_output_dir_on_a_read_only_or_full_file_system_is_refused(tmp_path, tiny_llama_dir, guanaco_dir, options,
                                                                   parts):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, options):
        pytest.skip("needs root to mount a tmpfs")
    try:
        r = train(tiny_llama_dir, guanaco_dir, mnt / "run")
        one_line(r, 2, f"output.dir={mnt / 'run'}", *parts)
        assert not (mnt / "run").exists()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ----------------------------------------------------------------------------------------------------------------
# Bad data: one line naming the file and row, nothing written


def test_a_csv_row_with_more_fields_than_its_header(tmp_path, tiny_llama_dir):
    data = tmp_path / "rows.csv"
    data.write_text("text\n" + "".join(f'"{t}"\n' for t in rows(4)) + f"{rows(1)[0]},a stray field\n")
    r = train(tiny_llama_dir, data, tmp_path / "run")
    one_line(r, 2, f"{data} row 4 (line 6) has 2 fields, the header names 1", "data.bad_rows=skip")
    assert not (tmp_path / "run").exists()


def test_a_json_line_nested_200k_deep(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", rows(), {2: "[" * 200_000})
    r = train(tiny_llama_dir, data, tmp_path / "run")
    one_line(r, 2, f"{data} line 3 is nested too deeply", "data.bad_rows=skip")
    assert not (tmp_path / "run").exists()


def test_a_json_file_nested_200k_deep(tmp_path, tiny_llama_dir):
    data = tmp_path / "rows.json"
    data.write_text("[" * 200_000 + "]" * 200_000)
    one_line(train(tiny_llama_dir, data, tmp_path / "run"), 2, f"{data} is nested too deeply", "fix the file")


def test_every_held_out_row_too_long_is_refused(tmp_path, tiny_llama_dir):
    """The held-out split is a seeded permutation of the rows (lorafit.data.pipeline): its rows get prompts longer than
    max_length, the others stay short, so training rows remain and evaluation would run on nothing."""
    n, n_eval = 20, 4  # eval_fraction 0.2
    order = list(range(n))
    random.Random(42).shuffle(order)
    held = set(order[:n_eval])
    long_prompt = " ".join(["word"] * 200)
    texts = [GOOD.format(n=i, m=2 * i) if i not in held else f"<s>[INST] {long_prompt} [/INST] yes </s>"
             for i in range(n)]
    data = write_jsonl(tmp_path / "rows.jsonl", texts)
    r = train(tiny_llama_dir, data, tmp_path / "run", "data.eval_fraction=0.2", "data.max_length=64")
    one_line(r, 2, "every one of the 4 held-out rows' prompts is longer than data.max_length=64",
             "raise data.max_length", "data.eval_fraction=0")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_csv_field_over_128_kib_is_read_and_truncated(tmp_path, tiny_llama_dir):
    """Python's csv module refuses fields over 128 KiB by default; a long document is data, not a mistake."""
    long = GOOD.format(n=1, m=2).replace("It is 2.", "It is " + "very " * 40_000 + "long.")
    data = tmp_path / "rows.csv"
    data.write_text("text\n" + "".join(f'"{t}"\n' for t in [*rows(8), long]))
    out = tmp_path / "run"
    r = train(tiny_llama_dir, data, out, steps=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_summary(out)["data"]["truncated_rows"] == 1
    assert run_status.read_status(out)["state"] == "finished"


@pytest.mark.slow
def test_a_deeply_nested_line_is_skipped_when_asked(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", rows(), {2: "{" * 200_000})
    out = tmp_path / "run"
    r = train(tiny_llama_dir, data, out, "data.bad_rows=skip", steps=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_summary(out)["data"]["skipped_rows"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Resuming: a refused resume changes nothing


@pytest.fixture
def four_steps(tmp_path, tiny_llama_dir, guanaco_dir) -> Path:
    """A run stopped on a signal after step 4 with checkpoints 2 and 4 (status stopped_to_resume)."""
    out = tmp_path / "run"
    r = train(tiny_llama_dir, guanaco_dir, out, "checkpoint.every_steps=2", "checkpoint.keep_last=0", steps=8,
              env={"LORAFIT_TEST_SIGNAL_AT": "0:4"})
    assert r.returncode == 75, r.stderr[-3000:]
    assert [s for s, _ in ck.committed(out)] == [2, 4]
    return out


@pytest.mark.slow
def test_a_refused_resume_from_an_older_checkpoint_keeps_the_newer_one(four_steps, tiny_llama_dir, tmp_path):
    before = snapshot(four_steps)
    r = train(tiny_llama_dir, tmp_path / "mistyped", four_steps, steps=8,
              resume=str(four_steps / "checkpoints" / "checkpoint-2"))
    one_line(r, 2, "data.path", "mistyped does not exist")
    assert snapshot(four_steps) == before  # checkpoint-4, latest, recipe.yaml, status.json, log.txt: all as they were


@pytest.mark.slow
def test_a_resume_with_another_lora_rank_keeps_recipe_yaml(four_steps, tiny_llama_dir, guanaco_dir):
    before = snapshot(four_steps)
    r = train(tiny_llama_dir, guanaco_dir, four_steps, "lora.r=4", steps=8)
    one_line(r, 2, "was saved for a different LoRA shape", f"({four_steps}/recipe.yaml)")
    assert snapshot(four_steps) == before
    assert "r: 8" in (four_steps / "recipe.yaml").read_text()  # the recipe the message points at is the saved one


@pytest.mark.slow
def test_resume_auto_never_falls_back_past_a_checkpoint_without_manifest(four_steps, tiny_llama_dir, guanaco_dir):
    (four_steps / "checkpoints" / "checkpoint-4" / "manifest.json").unlink()
    before = snapshot(four_steps)
    r = train(tiny_llama_dir, guanaco_dir, four_steps, steps=8)
    one_line(r, 2, "checkpoint-4 has no manifest.json", "does not fall back to an older checkpoint on its own",
             "checkpoint-2", "--resume PATH")
    assert snapshot(four_steps) == before


@pytest.mark.slow
def test_a_resume_from_an_older_checkpoint_sets_the_newer_one_aside_until_the_next_commit(four_steps, tiny_llama_dir,
                                                                                           guanaco_dir):
    """Killed before its first commit, the resumed run leaves the newer lineage aside, whole, for a person to
    restore; `latest` names the checkpoint it resumed from."""
    r = train(tiny_llama_dir, guanaco_dir, four_steps, "checkpoint.every_steps=2", "checkpoint.keep_last=0", steps=8,
              resume=str(four_steps / "checkpoints" / "checkpoint-2"),
              env={"LORAFIT_TEST_KILL_AT": "0", "LORAFIT_TEST_KILL_STEP": "4"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    root = four_steps / "checkpoints"
    aside = root / ".retired-checkpoint-4"
    ck.verify(aside)  # whole, manifest and all
    assert [s for s, _ in ck.committed(four_steps)] == [2]
    assert (root / "latest").read_text() == "checkpoint-2\n"
    # run again: it resumes from checkpoint-2 and its first commit replaces what was set aside
    r = train(tiny_llama_dir, guanaco_dir, four_steps, "checkpoint.every_steps=2", "checkpoint.keep_last=0", steps=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not aside.exists() and [s for s, _ in ck.committed(four_steps)] == [2, 4, 6, 8]


# ----------------------------------------------------------------------------------------------------------------
# Runs that learn nothing usable fail (exit 3), and status.json ends terminal on every path


@pytest.mark.slow
def test_a_diverged_adapter_is_never_called_finished(tmp_path, tiny_llama_dir, guanaco_dir):
    """After its last step one adapter weight holds NaN (injected: losses and gradients stayed finite, so the step
    guard saw nothing): the run fails instead of saving it and calling it finished."""
    out = tmp_path / "run"
    r = train(tiny_llama_dir, guanaco_dir, out, "checkpoint.every_steps=0", "checkpoint.every_minutes=0", steps=2,
              env={"LORAFIT_TEST_POISON_AT": "2"})
    one_line(r, 3, "the adapter's weights are not finite after step 2", "lora_B", "lower training.learning_rate")
    st = run_status.read_status(out)
    assert (st["state"], st["exit_code"]) == ("failed", 3)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()


@pytest.mark.slow
def test_a_checkpoint_of_a_diverged_adapter_is_never_saved(tmp_path, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "run"
    r = train(tiny_llama_dir, guanaco_dir, out, "checkpoint.every_steps=1", steps=4,
              env={"LORAFIT_TEST_POISON_AT": "3"})
    one_line(r, 3, "the adapter's weights are not finite at step 3", "no checkpoint was saved from them",
             "checkpoint-2 (intact)")
    assert [s for s, _ in ck.committed(out)] == [1, 2]  # keep_last=2: the last two good ones
    st = run_status.read_status(out)
    assert (st["state"], st["exit_code"], st["step"]) == ("failed", 3, 3)


@pytest.mark.slow
def test_a_run_whose_every_step_was_skipped_fails(tmp_path, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "run"
    r = train(tiny_llama_dir, guanaco_dir, out, steps=3, env={"LORAFIT_TEST_NAN_AT": "0:1-3"})
    one_line(r, 3, "every one of this run's 3 optimizer steps had a non-finite loss or gradient")
    st = run_status.read_status(out)
    assert (st["state"], st["exit_code"]) == ("failed", 3)


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_a_failed_status(tmp_path, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "run"
    r = train(tiny_llama_dir, guanaco_dir, out, "checkpoint.every_steps=2", steps=6,
              env={"LORAFIT_TEST_ENOSPC_AT": "4"})
    one_line(r, 2, "No space left on device while saving checkpoint-4", "checkpoint-2 (intact)",
             "free space on that file system")
    st = run_status.read_status(out)
    assert (st["state"], st["exit_code"], st["step"]) == ("failed", 2, 4)
    assert [s for s, _ in ck.committed(out)] == [2] and not (out / "checkpoints" / ".staging").exists()


@pytest.mark.slow
def test_an_interrupt_leaves_a_terminal_status(tmp_path, tiny_llama_dir, guanaco_dir):
    """Ctrl-C (SIGINT) mid-training: status.json says failed with exit code 130, not running."""
    out = tmp_path / "run"
    # far more steps than the run can make before the signal, however fast the machine and short the rows
    args = ["--recipe", "llama2_guanaco", *tiny_overrides(tiny_llama_dir, guanaco_dir, out, steps=100_000)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    # A shell's background job (`cmd &`, nohup) starts with SIGINT ignored, and Python then leaves Ctrl-C ignored, as
    # a user who ran it that way asked: the run would train on through the signal and this test would wait out its
    # timeout. The child gets the terminal's default disposition, as a Ctrl-C in a terminal finds it, so the test does
    # not depend on how the suite was launched.
    p = subprocess.Popen([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if "step 3/100000" in line:
            p.send_signal(signal.SIGINT)
            break
    try:
        p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130
    st = run_status.read_status(out)
    assert (st["state"], st["exit_code"]) == ("failed", 130)
    assert not (out / ".lock").exists()
