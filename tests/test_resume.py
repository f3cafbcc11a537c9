"""Resume through the real CLI on the tiny Llama: a run stopped (signal, kill -9 mid-save) and resumed in a new
process ends bit-identical to an uninterrupted run (per-step losses, gradient norms, learning rates and the final
adapter); damaged, incompatible or locked run folders are refused with one line; non-finite steps are skipped on
every rank together.

Bit-exact on CPU because everything a step depends on is restored: adapter and optimizer tensors, scheduler, the
per-rank RNG (dropout), and the data position (HF skips the consumed batches of the seeded sampler).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_scalars, read_summary, run_cli, set_args, tiny_overrides

from lorafit.errors import EXIT_NONFINITE
from lorafit.run import commit as ck
from lorafit.run import status as run_status

STEPS = 6
TAGS = ("train/loss", "train/grad_norm", "train/learning_rate")


def sets(model_dir, data_dir, out, *extra) -> list[str]:
    # lr 1e-2 (not the recipe's 2e-4) so that six steps move the adapter well beyond float32 rounding: a resume that
    # restored anything wrongly could not end on the same bits by chance.
    more = ["training.learning_rate=0.01", "checkpoint.every_steps=2", "checkpoint.every_minutes=0", *extra]
    return tiny_overrides(model_dir, data_dir, out, steps=STEPS) + set_args(more)


def train(model_dir, data_dir, out, *extra, env=None, launcher=None, resume=None) -> subprocess.CompletedProcess:
    args = ["--recipe", "llama2_guanaco", *sets(model_dir, data_dir, out, *extra)]
    if resume:
        args += ["--resume", resume]
    return run_cli(args, env=env, launcher=launcher)


def out_of(r: subprocess.CompletedProcess) -> str:
    return r.stdout[-4000:] + r.stderr[-4000:]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def assert_same_training(straight: Path, resumed: Path) -> None:
    """Per-step scalars (each step exactly once: no duplicates after a resume) and the final adapter, bit for bit."""
    import torch
    from safetensors.torch import load_file

    a, b = read_scalars(straight / "tb"), read_scalars(resumed / "tb")
    for tag in TAGS:
        assert [s for s, _ in b[tag]] == list(range(1, STEPS + 1)), (tag, b[tag])
        assert len(a[tag]) == len(b[tag]) and all(_same(x, y) for (_, x), (_, y) in zip(a[tag], b[tag])), (
            tag,
            a[tag],
            b[tag],
        )
    wa = load_file(straight / "adapter_model.safetensors")
    wb = load_file(resumed / "adapter_model.safetensors")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama_dir, guanaco_dir) -> Path:
    """The uninterrupted reference run: 6 steps, checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("straight") / "run"
    r = train(tiny_llama_dir, guanaco_dir, out)
    assert r.returncode == 0, out_of(r)
    return out


@pytest.mark.slow
def test_sigusr1_stop_then_kill_9_mid_save_then_resume_is_bit_exact(tmp_path, straight, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "run"
    # 1. A real SIGUSR1, sent by the process to itself at the start of step 3 (a deterministic stop point).
    r = train(tiny_llama_dir, guanaco_dir, out, env={"LORAFIT_TEST_SIGNAL_AT": "0:3"})
    assert r.returncode == 75, out_of(r)
    assert "SIGUSR1 received: saving a checkpoint at the next step boundary" in r.stderr
    status = run_status.read_status(out)
    assert (status["state"], status["step"], status["exit_code"]) == ("stopped_to_resume", 3, 75)
    assert [s for s, _ in ck.committed(out)] == [2, 3]  # the periodic one at 2, the stop one at 3
    assert not (out / "adapter_model.safetensors").exists()  # the run is not finished

    # 2. Resumed, then killed -9 during the save of step 4 after its manifest is written, before the rename that
    # commits it: the most complete-looking partial state (every other kill point: tests/test_checkpoint.py).
    n_files = len(ck.read_manifest(straight / "checkpoints" / "checkpoint-4")["files"])
    env = {"LORAFIT_TEST_KILL_STEP": "4", "LORAFIT_TEST_KILL_AT": str(n_files + 1)}
    r = train(tiny_llama_dir, guanaco_dir, out, env=env)
    assert r.returncode == -signal.SIGKILL, out_of(r)
    assert f"resuming from {out}/checkpoints/checkpoint-3 (step 3, verified" in r.stdout
    staging = out / "checkpoints" / ".staging" / "checkpoint-4"
    assert (staging / "manifest.json").is_file()  # complete, yet not committed: never offered
    assert [s for s, _ in ck.committed(out)] == [2, 3]
    assert (out / "checkpoints" / "latest").read_text() == "checkpoint-3\n"

    # 3. --resume auto (the default) takes checkpoint-3 again, cleans the staging folder and runs to the end.
    r = train(tiny_llama_dir, guanaco_dir, out)
    assert r.returncode == 0, out_of(r)
    assert "removed what interrupted saves left" in r.stdout and "checkpoint-3 (step 3, verified" in r.stdout
    assert_same_training(straight, out)
    assert not staging.parent.exists()
    assert [s for s, _ in ck.committed(out)] == [4, 6]
    summary = read_summary(out)
    assert (summary["steps"], summary["resumed_at_step"]) == (STEPS, 3)
    assert run_status.read_status(out)["state"] == "finished"

    # 4. A finished run folder: say so, exit 0, touch nothing.
    r = train(tiny_llama_dir, guanaco_dir, out)
    assert r.returncode == 0, out_of(r)
    assert f"run folder {out} holds a finished run (6 steps); nothing to resume" in r.stdout
    assert read_summary(out) == summary


@pytest.mark.slow
def test_logged_curves_and_summary_continue_across_a_resume(tmp_path, tiny_llama_dir, guanaco_dir):
    """Logging every 2 steps, stopped at step 3 (between two logs) and resumed: the logged loss at step 4 averages
    steps 3 and 4 as the uninterrupted run's does, tokens_seen continues from the stopped run's count, and
    summary.json keeps the evaluation before training (eval_loss_before) that only the first run made."""
    extra = ["logging.steps=2", "data.eval_fraction=0.2", "training.eval_steps=3"]
    ref, out = tmp_path / "straight", tmp_path / "run"
    assert train(tiny_llama_dir, guanaco_dir, ref, *extra).returncode == 0
    r = train(tiny_llama_dir, guanaco_dir, out, *extra, env={"LORAFIT_TEST_SIGNAL_AT": "0:3"})
    assert r.returncode == 75, out_of(r)
    r = train(tiny_llama_dir, guanaco_dir, out, *extra)
    assert r.returncode == 0, out_of(r)
    a, b = read_scalars(ref / "tb"), read_scalars(out / "tb")
    for tag in ("train/loss", "train/tokens_seen", "eval/loss", "train/learning_rate"):
        assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], (tag, a[tag], b[tag])
        assert all(_same(x, y) for (_, x), (_, y) in zip(a[tag], b[tag])), (tag, a[tag], b[tag])
    sa, sb = read_summary(ref), read_summary(out)
    for key in ("eval_loss_before", "eval_loss_final", "tokens_seen", "first_losses", "final_loss"):
        assert sb[key] == sa[key], (key, sa.get(key), sb.get(key))


@pytest.mark.slow
def test_fast_path_optimizer_and_fused_layers_resume_bit_exact(tmp_path, tiny_llama_dir, guanaco_dir):
    """The fast recipe's own pieces on CPU: the sync-free AdamW, whose moments live in one flat buffer per group
    (saved per parameter as views of it), and the fused 4-bit layers, stopped at step 3 and resumed, against an
    uninterrupted run with them; a NaN step on the way is skipped (every gradient dropped) on both."""
    fast = ("training.optimizer=lorafit_adamw_32bit", "lora.fused=true")
    nan = {"LORAFIT_TEST_NAN_AT": "0:5"}
    ref, out = tmp_path / "straight", tmp_path / "run"
    r = train(tiny_llama_dir, guanaco_dir, ref, *fast, env=nan)
    assert r.returncode == 0, out_of(r)
    r = train(tiny_llama_dir, guanaco_dir, out, *fast, env={**nan, "LORAFIT_TEST_SIGNAL_AT": "0:3"})
    assert r.returncode == 75, out_of(r)
    r = train(tiny_llama_dir, guanaco_dir, out, *fast, env=nan)
    assert r.returncode == 0, out_of(r)
    assert_same_training(ref, out)
    s = read_summary(out)
    assert (s["resumed_at_step"], s["skipped_steps"], s["fused_4bit_layers"]["lora"]) == (3, 1, 4)
    assert s["optimizer_steps_per_rank"] == [STEPS - 1]


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_with_the_last_good_checkpoint(tmp_path, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "run"
    r = train(
        tiny_llama_dir, guanaco_dir, out, "checkpoint.max_consecutive_skips=2", env={"LORAFIT_TEST_NAN_AT": "0:3-6"}
    )
    assert r.returncode == EXIT_NONFINITE, out_of(r)
    good = out / "checkpoints" / "checkpoint-2"
    assert f"after 2 consecutive steps with a non-finite loss or gradient; the last good checkpoint is {good}" in (
        r.stdout
    )
    status = run_status.read_status(out)
    assert (status["state"], status["step"], status["checkpoint"]) == ("stopped_nonfinite", 4, str(good))
    assert [s for s, _ in ck.committed(out)] == [2]  # no save from the bad stretch (step 4 would have been one)
    ck.verify(good)
    skipped = read_scalars(out / "tb")["train/skipped_steps"]
    assert [v for _, v in skipped] == [0, 0, 1, 2]


def _stopped_copy(straight: Path, dst: Path) -> Path:
    shutil.copytree(straight, dst)
    run_status.write_status(dst, "stopped_to_resume", step=STEPS)  # so that --resume auto tries its checkpoints
    return dst


@pytest.mark.slow
def test_checkpoint_with_a_flipped_byte_is_refused(tmp_path, straight, tiny_llama_dir, guanaco_dir):
    # (a missing file, a truncated file, a torn manifest: their messages in tests/test_checkpoint.py)
    out = _stopped_copy(straight, tmp_path / "run")
    newest = out / "checkpoints" / "checkpoint-6"
    _flip(newest / "optimizer.pt")
    r = train(tiny_llama_dir, guanaco_dir, out)
    assert r.returncode == 2, out_of(r)
    assert r.stderr.strip().splitlines()[-1] == (
        f"lorafit: error: checkpoint {newest} is corrupted: the sha256 of optimizer.pt does not match its manifest; "
        "resume from an older checkpoint with --resume PATH, or start a new output.dir"
    )
    assert newest.is_dir() and (out / "summary.json").is_file()  # an existing run folder is left as it was


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)


@pytest.mark.slow
def test_checkpoint_of_another_lora_shape_is_refused(tmp_path, straight, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "new"
    src = straight / "checkpoints" / "checkpoint-4"
    r = train(tiny_llama_dir, guanaco_dir, out, "lora.r=4", resume=str(src))
    assert r.returncode == 2, out_of(r)
    assert (
        f"lorafit: error: checkpoint {src} was saved for a different LoRA shape: "
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight is [8, 64] there, [4, 64] "
        "here"
    ) in r.stderr
    assert not out.exists()  # the run folder this invocation created is removed again


@pytest.mark.slow
def test_second_run_on_a_locked_folder_is_refused(tmp_path, straight, tiny_llama_dir, guanaco_dir):
    import socket

    out = _stopped_copy(straight, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".lock").write_text(
            json.dumps(
                {"pid": holder.pid, "host": socket.gethostname(), "start": run_status.start_ticks(holder.pid), "since": "then"}
            )
        )
        r = train(tiny_llama_dir, guanaco_dir, out)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, out_of(r)
    assert f"lorafit: error: run folder {out} is in use by another run (pid {holder.pid}" in r.stderr
    assert (out / ".lock").is_file() and run_status.read_status(out)["state"] == "stopped_to_resume"  # untouched


# ----------------------------------------------------------------------------------------------------------------
# Two processes (gloo on CPU)


def _launcher(tmp_path_factory) -> list[str]:
    cfg = REPO / "launch" / "cpu_ddp.yaml"
    if not cfg.is_file():
        cfg = tmp_path_factory.mktemp("launch") / "cpu_ddp.yaml"
        cfg.write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: 'no'\n"
            "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\ngpu_ids: all\nrdzv_backend: static\n"
            "same_network: true\nmain_process_port: 0\n"
        )
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [accelerate, "launch", "--config_file", str(cfg), "--num_processes", "2"]


DDP_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "LORAFIT_TEST_NAN_AT": "1:2"}  # NaN loss on rank 1


@pytest.fixture(scope="module")
def straight_ddp(tmp_path_factory, tiny_llama_dir, guanaco_dir) -> Path:
    out = tmp_path_factory.mktemp("straight-ddp") / "run"
    r = train(tiny_llama_dir, guanaco_dir, out, env=DDP_ENV, launcher=_launcher(tmp_path_factory))
    assert r.returncode == 0, out_of(r)
    return out


@pytest.mark.distributed
def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(straight_ddp):
    s = read_summary(straight_ddp)
    # 6 steps, step 2 skipped: AdamW's own step counter is 5 on both ranks (no update anywhere at step 2).
    assert (s["world_size"], s["steps"], s["skipped_steps"], s["nonfinite_steps"]) == (2, STEPS, 1, 1)
    assert s["optimizer_steps_per_rank"] == [STEPS - 1, STEPS - 1]
    assert [v for _, v in read_scalars(straight_ddp / "tb")["train/skipped_steps"]] == [0, 1, 1, 1, 1, 1]
    assert math.isfinite(s["final_loss"])


@pytest.mark.distributed
def test_two_process_stop_and_resume_is_bit_exact(
    tmp_path, tmp_path_factory, straight_ddp, tiny_llama_dir, guanaco_dir
):
    out = tmp_path / "run"
    launcher = _launcher(tmp_path_factory)
    # SIGUSR1 reaches rank 0 only: the per-step collective makes rank 1 stop at the same boundary.
    r = train(tiny_llama_dir, guanaco_dir, out, env={**DDP_ENV, "LORAFIT_TEST_SIGNAL_AT": "0:3"}, launcher=launcher)
    # accelerate launch (torchrun) reports a worker's non-zero exit as its own exit 1; status.json keeps the 75.
    assert r.returncode != 0 and "exitcode: 75" in out_of(r).replace("exitcode  : ", "exitcode: "), out_of(r)
    status = run_status.read_status(out)
    assert (status["state"], status["step"], status["exit_code"]) == ("stopped_to_resume", 3, 75)
    manifest = ck.verify(out / "checkpoints" / "checkpoint-3")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"])  # per-rank RNG
    r = train(tiny_llama_dir, guanaco_dir, out, env=DDP_ENV, launcher=launcher)
    assert r.returncode == 0, out_of(r)
    assert_same_training(straight_ddp, out)
    assert read_summary(out)["optimizer_steps_per_rank"] == [STEPS - 1, STEPS - 1]
    assert os.environ.get("LORAFIT_TEST_SIGNAL_AT") is None  # the hooks never leak into this process


@pytest.mark.distributed
def test_fsdp2_stop_and_resume_is_bit_exact_and_its_adapter_loads_in_peft(tmp_path, tiny_llama_dir, guanaco_dir):
    """FSDP2 (launch/fsdp2.yaml, 2 CPU processes over gloo): SIGUSR1 stops with a committed checkpoint and exit 75,
    the resume ends bit-identical to the uninterrupted run, and the saved adapter is one process's format, loadable
    by plain PEFT onto the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = [accelerate, "launch", "--config_file", str(REPO / "launch" / "fsdp2.yaml"), "--num_processes", "2",
                "--mixed_precision", "no"]
    env = {"OMP_NUM_THREADS": "1"}
    ref, out = tmp_path / "straight", tmp_path / "run"
    assert train(tiny_llama_dir, guanaco_dir, ref, env=env, launcher=launcher).returncode == 0
    r = train(tiny_llama_dir, guanaco_dir, out, env={**env, "LORAFIT_TEST_SIGNAL_AT": "0:3"}, launcher=launcher)
    assert r.returncode != 0 and "exitcode: 75" in out_of(r).replace("exitcode  : ", "exitcode: "), out_of(r)
    assert run_status.read_status(out)["state"] == "stopped_to_resume"
    assert [s for s, _ in ck.committed(out)] == [2, 3]
    r = train(tiny_llama_dir, guanaco_dir, out, env=env, launcher=launcher)
    assert r.returncode == 0, out_of(r)
    assert read_summary(out)["layout"] == "fsdp2"
    assert_same_training(ref, out)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    net = PeftModel.from_pretrained(base, str(out))  # plain PEFT, no lorafit
    assert sum(p.abs().sum().item() for n, p in net.named_parameters() if "lora_B" in n) > 0
