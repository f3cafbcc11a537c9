"""The benchmark scripts' own arithmetic (bench/): what runs on the GPU box must count right."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import profile_step  # noqa: E402
import trl_reference  # noqa: E402


def test_trl_reference_rates_pair_each_step_with_its_own_tokens():
    # step i consumed counts[i]; the prefetched 5th count has no step; the first step has no cycle (None)
    counts = [100, 200, 300, 400, 999]
    cycles = [None, 2.0, 3.0, 4.0]
    assert trl_reference.step_rates(counts, cycles, 1, 4) == [100.0, 100.0, 100.0]
    assert trl_reference.step_rates(counts, cycles, 0, 4) == [100.0, 100.0, 100.0]  # the None is skipped
    assert trl_reference.step_rates(counts, [1.0, 1.0, 2.0, 2.0], 2, 4) == [150.0, 200.0]


def test_gap_analysis_names_what_the_host_was_doing(tmp_path):
    """Two kernels 290 us apart: one gap, ended by a kernel that aten::mm launched inside Optimizer.step 248 us
    before it ran; one stream sync inside Optimizer.step."""
    ev = [{"ph": "X", "cat": "cpu_op", "name": "Optimizer.step", "ts": 0, "dur": 100, "tid": 1},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 50, "dur": 10, "tid": 1},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 52, "dur": 2, "tid": 1,
           "args": {"correlation": 7}},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 30, "dur": 2, "tid": 1,
           "args": {"correlation": 8}},
          {"ph": "X", "cat": "kernel", "name": "k1", "ts": 0, "dur": 10, "args": {"correlation": 6}},
          {"ph": "X", "cat": "kernel", "name": "k2", "ts": 300, "dur": 10, "args": {"correlation": 7}},
          {"ph": "X", "cat": "kernel", "name": "k3", "ts": 350, "dur": 10, "args": {"correlation": 9}}]  # 40 us gap
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": ev}))
    got = profile_step.gaps_from_trace(tmp_path / "t.json")
    assert got["gaps"] == 1 and got["idle_ms_total_over_gaps"] == 0.29
    (gap,) = got["largest"]
    assert gap["after_kernel"] == "k1" and gap["next_kernel"] == "k2"
    assert gap["next_launched_ms_before_it_ran"] == 0.248 and gap["host_ops_at_launch"] == ["Optimizer.step", "aten::mm"]
    assert got["sync_calls"] == [("cudaStreamSynchronize > Optimizer.step", 1)]


def test_without_turns_the_sync_free_pieces_off_for_the_benchmarks_only():
    """bench/without.py, the off side of throughput.py's pairs: it replaces the pieces in lorafit's modules before
    src/train.py looks them up; lorafit itself has no such switch."""
    import torch
    import without

    import lorafit.attention
    import lorafit.fused
    import lorafit.lm_head

    saved = lorafit.attention.skip_mask_building, lorafit.lm_head.install_indexed_lm_head, lorafit.fused._dropout_grad_add
    try:
        without.turn_off(["indexed_lm_head"])
        assert lorafit.lm_head.install_indexed_lm_head(object()) is False
        assert lorafit.attention.skip_mask_building is saved[0]  # only what was asked
        without.turn_off(["mask_skip"])
        assert lorafit.attention.skip_mask_building(object()) is None
        assert lorafit.fused._dropout_grad_add is saved[2]
        without.turn_off(["dropout_grad_kernel"])
        gx = torch.tensor([1.0, 2.0])
        lorafit.fused._dropout_grad_add(gx, torch.tensor([3.0, 3.0]), torch.tensor([True, False]), 2.0)
        assert gx.tolist() == [7.0, 2.0]  # 1 + 2 * 3 * 1, 2 + 2 * 3 * 0: addcmul_'s arithmetic
    finally:
        (lorafit.attention.skip_mask_building, lorafit.lm_head.install_indexed_lm_head,
         lorafit.fused._dropout_grad_add) = saved
    import pytest

    with pytest.raises(SystemExit, match="unknown piece"):
        without.turn_off(["mask_skp"])


def test_profile_step_builds_and_profiles_a_cpu_run(tmp_path, tiny_llama_dir, guanaco_dir):
    """bench/profile_step.py builds the run as src/train.py does: a rename in lorafit must not leave it behind (it
    once called a loader that had moved). Two profiled steps of the tiny model on CPU write the summary."""
    from conftest import run_cli, set_args, tiny_overrides

    sets = tiny_overrides(tiny_llama_dir, guanaco_dir, tmp_path / "unused")[1::2]  # the k=v after each --set
    sets = [s for s in sets if not s.startswith(("output.dir=", "training.max_steps="))]  # the script sets these
    args = ["--recipe", "llama2_guanaco", *set_args(sets), "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "p")]
    r = run_cli(args, script="bench/profile_step.py")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["device"] == "cpu" and s["profiled_steps"] == 2 and len(s["wall_s_per_step"]) == 2


def test_a_shape_runs_both_sides_on_the_tokenizer_folder_itself(monkeypatch, tmp_path):
    """With --shape every run loads the Llama-2 tokenizer from its own folder: from a Qwen2 checkpoint's folder
    transformers would load it as Qwen2Tokenizer (byte-level, 1.54x the tokens on guanaco; bench/make_checkpoint.py)."""
    import argparse

    import throughput

    seen = []
    monkeypatch.setattr(throughput, "_go", lambda name, cmd, *rest: seen.append(cmd) or {})
    a = argparse.Namespace(model="/ckpt/shape-qwen2.5-7b", tokenizer="/tok/llama-2", shape="qwen2.5-7b",
                           data="/d", steps=3, warmup=1, scratch=str(tmp_path))
    throughput.run_trl("trl_liger", a, tmp_path)
    throughput.run_lorafit("lorafit:qwen2_5_7b_fast+data.chat_template=auto", a, tmp_path)
    trl, ours = seen
    assert trl[trl.index("--tokenizer") + 1] == "/tok/llama-2"
    assert "model.tokenizer=/tok/llama-2" in ours
    a.shape, seen[:] = None, []  # --model: the folder's own tokenizer, as a user's checkpoint has
    throughput.run_trl("trl_liger", a, tmp_path)
    throughput.run_lorafit("lorafit:qwen2_5_7b_fast", a, tmp_path)
    assert "--tokenizer" not in seen[0] and not any(x.startswith("model.tokenizer") for x in seen[1])
