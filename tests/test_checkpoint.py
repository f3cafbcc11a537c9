"""The checkpoint commit protocol, verification, the run lock and the compatibility check, without training.

Kill -9 during a save is exercised here at every event of a save (each staged file, mid-write, and each step of the
commit) in a forked child, so it costs milliseconds; tests/test_resume.py repeats two offsets end to end.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafit import optim
from lorafit.errors import UserError
from lorafit.run import commit as ck
from lorafit.run import faults, files, session, signals, status

# A staged checkpoint shaped like HF's (ten files, one of them in a sub-folder as DeepSpeed writes them).
FILES = [
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "lorafit_state.json",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "tokenizer.json",
    "trainer_state.json",
    "global_step4/zero_pp_rank_0.pt",
]


def stage(run: Path, step: int) -> Path:
    staging = run / ck.CKPT_DIR / ck.STAGING / f"{ck.PREFIX}{step}"
    for i, name in enumerate(FILES):
        p = staging / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([step % 251, i]) * (1000 + 100 * i))  # distinct content per step and file
    return staging


def committed_steps(run: Path) -> list[int]:
    return [s for s, _ in ck.committed(run)]


def test_commit_writes_manifest_moves_latest_and_keeps_last_k(tmp_path):
    for step in (2, 4, 6):
        final = ck.commit(stage(tmp_path, step), step, keep_last=2, is_main=True)
        assert final == tmp_path / "checkpoints" / f"checkpoint-{step}"
    assert committed_steps(tmp_path) == [4, 6]  # keep_last=2 retired checkpoint-2
    assert (tmp_path / "checkpoints" / "latest").read_text() == "checkpoint-6\n"
    manifest = ck.verify(tmp_path / "checkpoints" / "checkpoint-6")
    assert sorted(manifest["files"]) == sorted(FILES)
    f = manifest["files"]["optimizer.pt"]
    assert f["size"] == 2800  # the 2-byte pattern repeated 1000 + 100 x 4 times, as staged above
    assert f["sha256"] == files.sha256(tmp_path / "checkpoints" / "checkpoint-6" / "optimizer.pt")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6", "latest"]


def test_keep_last_zero_keeps_everything(tmp_path):
    for step in (1, 2, 3):
        ck.commit(stage(tmp_path, step), step, keep_last=0, is_main=True)
    assert committed_steps(tmp_path) == [1, 2, 3]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _flip_byte(d / "optimizer.pt", 700), "corrupted: the sha256 of optimizer.pt does not match"),
        (lambda d: (d / "scheduler.pt").unlink(), "incomplete: scheduler.pt, listed in its manifest, is missing"),
        (lambda d: os.truncate(d / "rng_state.pth", 10), "corrupted: rng_state.pth has 10 bytes, its manifest says"),
        (lambda d: (d / "manifest.json").unlink(), "is not a committed checkpoint (no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{"), "has an unreadable manifest.json"),
    ],
    ids=["flipped-byte", "missing-file", "truncated-file", "no-manifest", "torn-manifest"],
)
def test_verify_refuses_a_damaged_checkpoint_with_one_line(tmp_path, damage, message):
    folder = ck.commit(stage(tmp_path, 3), 3, keep_last=2, is_main=True)
    ck.verify(folder)
    damage(folder)
    with pytest.raises(UserError) as e:
        ck.verify(folder)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(data)


def _save_in_child(run: Path, step: int, kill_at: int) -> int:
    """Fork a child that stages and commits checkpoint `step` with the kill hook armed; return its exit signal."""

    def child():
        os.environ["LORAFIT_TEST_KILL_AT"] = str(kill_at)
        hook = faults._KillHook()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # the hook's own message
        ck.commit(stage(run, step), step, keep_last=2, is_main=True, on_event=hook)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    return proc.exitcode


def test_kill_9_at_every_point_of_a_save_never_offers_a_partial_checkpoint(tmp_path):
    # Events: 10 files (each truncated to half, as if killed mid-write), manifest tmp, manifest, committed,
    # latest; then, with two older checkpoints to retire... here one: retired, trash partly deleted = 16.
    seed = tmp_path / "seed"
    for step in (2, 4):
        ck.commit(stage(seed, step), step, keep_last=2, is_main=True)
    n_events = len(FILES) + 4 + 2
    assert n_events >= 10
    for i in range(n_events + 1):
        run = tmp_path / f"k{i}"
        subprocess.run(["cp", "-a", str(seed), str(run)], check=True)
        code = _save_in_child(run, 6, i)
        killed = code == -signal.SIGKILL
        assert killed == (i < n_events), f"offset {i}: exit {code}"
        ck.clean_abandoned(run)  # what the next start does under the lock
        steps = committed_steps(run)
        # Before the commit point (the rename) the new checkpoint does not exist; after it, it is complete.
        committed_new = i >= len(FILES) + 2
        assert steps[-1] == (6 if committed_new else 4), f"offset {i}: {steps}"
        for _, folder in ck.committed(run):
            ck.verify(folder)  # every offered checkpoint is whole
        assert not (run / "checkpoints" / ".staging").exists()
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".trash")]
        latest = (run / "checkpoints" / "latest").read_text().strip()
        assert latest in {f.name for _, f in ck.committed(run)}, f"offset {i}: latest {latest} is not committed"


def test_clean_abandoned_removes_staging_and_trash_only(tmp_path):
    ck.commit(stage(tmp_path, 2), 2, keep_last=2, is_main=True)
    stage(tmp_path, 4)
    (tmp_path / "checkpoints" / ".trash-checkpoint-1-99").mkdir()
    gone = ck.clean_abandoned(tmp_path)
    assert sorted(gone) == [".staging", ".trash-checkpoint-1-99"]
    assert committed_steps(tmp_path) == [2]


# ----------------------------------------------------------------------------------------------------------------
# The run lock


def test_lock_refuses_a_second_run_and_is_released(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(
            json.dumps(
                {"pid": holder.pid, "host": socket.gethostname(), "start": status.start_ticks(holder.pid), "since": "now"}
            )
        )
        with pytest.raises(UserError) as e:
            status.RunLock(tmp_path).acquire()
        assert f"is in use by another run (pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    lock = status.RunLock(tmp_path)
    lock.acquire()  # the holder is dead now: its lock is stale and taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(UserError):
        status.RunLock(tmp_path).acquire()  # held by this (live) process
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_lock_of_another_host_is_respected_unless_it_is_this_slurm_job(tmp_path, monkeypatch):
    owner = {"pid": 1, "host": "some-other-node", "slurm_job_id": "777", "since": "earlier"}
    (tmp_path / ".lock").write_text(json.dumps(owner))
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(UserError, match="pid 1 on host some-other-node"):
        status.RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the same job, requeued: its earlier incarnation has ended
    lock = status.RunLock(tmp_path)
    lock.acquire()
    assert lock.held


def test_lock_with_a_recycled_pid_is_stale(tmp_path):
    # Our own pid, but a different process start time: the owner is gone and the pid was reused.
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": "1"}))
    lock = status.RunLock(tmp_path)
    lock.acquire()
    assert lock.held


# ----------------------------------------------------------------------------------------------------------------
# Compatibility of a checkpoint with the model


FP = {
    "arch": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2},
    "trainable": {"q.lora_A.default.weight": [8, 64], "q.lora_B.default.weight": [64, 8]},
}


@pytest.mark.parametrize(
    "here, world, message",
    [
        (
            {**FP, "arch": {**FP["arch"], "hidden_size": 32}},
            1,
            "was saved for a different base model: hidden_size is 64 there, 32 here",
        ),
        (
            {**FP, "trainable": {"q.lora_A.default.weight": [4, 64], "q.lora_B.default.weight": [64, 4]}},
            1,
            "different LoRA shape: q.lora_A.default.weight is [8, 64] there, [4, 64] here",
        ),
        (
            {**FP, "trainable": {**FP["trainable"], "v.lora_A.default.weight": [8, 64]}},
            1,
            "different LoRA targets (2 trainable tensors there, 3 here; v.lora_A.default.weight is only in this model)",
        ),
        (FP, 2, "was saved by 1 processes, this run has 2"),
    ],
    ids=["base", "lora-rank", "lora-targets", "world-size"],
)
def test_compare_refuses_another_shape(here, world, message):
    session.compare(Path("RUN/checkpoints/checkpoint-4"), FP, FP, 1, 1)  # identical: accepted
    with pytest.raises(UserError) as e:
        session.compare(Path("RUN/checkpoints/checkpoint-4"), FP, here, 1, world)
    assert message in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Signals


def test_first_signal_sets_the_flag_second_stops_at_once(tmp_path):
    trace = tmp_path / "trace"

    def child():
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        s = signals.StopSignals(on_hard_stop=lambda: trace.open("a").write("hard stop\n"))
        s.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)  # the handler runs at the next bytecode boundary
        trace.open("a").write(f"flag {s.received == signal.SIGUSR1}\n")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        trace.open("a").write("not reached\n")

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    assert trace.read_text().splitlines() == ["flag True", "hard stop"]
    assert proc.exitcode == 128 + signal.SIGTERM


def test_signals_blocked_by_the_launcher_are_unblocked(tmp_path):
    """A process started with SIGUSR1 blocked (the mask is inherited through exec) still gets the stop notice."""
    trace = tmp_path / "trace"

    def child():
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        s = signals.StopSignals()
        s.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        trace.write_text(f"{s.received == signal.SIGUSR1} {s.was_blocked}\n")

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    assert trace.read_text().split("\n")[0] == "True ['SIGUSR1']"


def test_status_round_trip(tmp_path):
    status.write_status(tmp_path, "stopped_to_resume", step=3, exit_code=75)
    st = status.read_status(tmp_path)
    assert (st["state"], st["step"], st["exit_code"], st["pid"]) == ("stopped_to_resume", 3, 75, os.getpid())
    assert status.read_status(tmp_path / "nowhere") == {}


def test_restored_paged_optimizer_state_loses_its_stale_paged_flag(tmp_path):
    """The DDP resume failure seen on 2 H100s, reduced to its cause: torch.save keeps a paged state tensor's
    `is_paged`/`page_deviceid` attributes and torch.load restores them on ordinary memory, which bitsandbytes then
    tries to prefetch as managed memory. After repage_optimizer_state no restored tensor claims to be paged (on CPU
    there is no paging: the flag goes; tests/test_gpu.py checks the CUDA side, where it is re-paged)."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")

    def fresh():
        p = torch.nn.Parameter(torch.zeros(400, 300))  # 120,000 elements: over bitsandbytes' 1e5 paging threshold
        return p, bnb.optim.PagedAdamW32bit([p], lr=1e-3)

    p, opt = fresh()
    p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[p]
    for k in ("state1", "state2"):  # what a CUDA run's state looks like when it is saved
        state[k].is_paged, state[k].page_deviceid = True, 1
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    saved = {k: state[k].clone() for k in ("state1", "state2")}

    p2, opt2 = fresh()
    opt2.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True, map_location="cpu"))
    restored = opt2.state[p2]
    assert getattr(restored["state1"], "is_paged", False)  # the cause: the flag survives the round trip
    assert optim.repage_optimizer_state(opt2) == 0  # nothing re-paged on CPU ...
    for k in ("state1", "state2"):
        assert not getattr(restored[k], "is_paged", False)  # ... but no stale flag left
        assert torch.equal(restored[k], saved[k])
    p2.grad = torch.ones_like(p2)
    opt2.step()  # and the restored optimizer steps
    assert optim.repage_optimizer_state(torch.optim.AdamW([p2])) == 0  # not a paged optimizer: untouched
