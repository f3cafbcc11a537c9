"""lorafit.graphs on the CPU: the fixed step shape, the padding that reaches it (exact values, worked by hand), the
loss it leaves unchanged, and where the layout turns the graphs off. The capture and replay run in tests/test_gpu.py."""

import logging

import pytest
import torch
from test_fastpath import packed, tiny_llama
from test_plan import LLAMA2_7B

from lorafit import graphs, layout, plan, recipe


def test_static_shape_bounds_every_step_of_the_data():
    # rows holding 5, 1, 7, 2 sequences, 3 rows a step: at most 7 + 5 + 2 real sequences, plus 3 pad ones
    s = graphs.static_shape(3, 1024, [5, 1, 7, 2])
    assert (s.tokens, s.max_len, s.seqs) == (3072, 1024, 17)


def test_pad_batch_fills_a_packed_step_to_the_fixed_shape():
    _, batch = packed([3, 2])
    batch["labels"] = batch["input_ids"].clone()
    ids = batch["input_ids"].clone()
    shape = graphs.StaticShape(tokens=12, max_len=4, seqs=6)
    assert graphs.pad_batch(batch, shape, pad_id=7)
    # 7 tokens to add: pad sequences of 4 and 3 (max_len 4), then 2 empty ones make the 6 sequences
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 12, 12, 12]
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert batch["input_ids"].tolist() == [ids[0].tolist() + [7] * 7]
    assert batch["labels"].tolist() == [ids[0].tolist() + [-100] * 7]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]


def test_pad_batch_leaves_a_step_that_does_not_fit_unchanged():
    for lens, shape in (([3, 2], graphs.StaticShape(tokens=4, max_len=4, seqs=6)),  # 5 tokens > 4
                        ([1, 1, 1], graphs.StaticShape(tokens=12, max_len=4, seqs=4)),  # 3 + 3 pad > 4 sequences
                        ([5], graphs.StaticShape(tokens=12, max_len=4, seqs=6))):  # a sequence longer than max_len
        _, batch = packed(lens)
        before = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        assert not graphs.pad_batch(batch, shape, pad_id=0)
        assert all(torch.equal(batch[k], v) if torch.is_tensor(v) else batch[k] == v for k, v in before.items())
    _, batch = packed([3])
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])  # a padded batch, not a padding-free one
    assert not graphs.pad_batch(batch, graphs.StaticShape(tokens=12, max_len=4, seqs=6), pad_id=0)


def test_padded_step_has_the_unpadded_loss_and_gradients():
    """The pad sequences attend only to themselves and carry no labels: the real tokens' loss and the gradients are
    the unpadded step's (float32 on the CPU: equal up to the matmuls' summation order)."""
    m = tiny_llama("varlen").train()
    _, batch = packed([9, 3, 12])
    batch["labels"] = batch["input_ids"].clone()
    padded = dict(batch)
    assert graphs.pad_batch(padded, graphs.static_shape(2, 16, [2, 1]), pad_id=0)
    assert padded["input_ids"].shape[1] == 32 and padded["cu_seq_lens_q"].numel() == 2 + 1 + 2 + 1

    def step(b):
        m.zero_grad(set_to_none=True)
        loss = m(**b).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    ref, g_ref = step(batch)
    got, g_got = step(padded)
    assert torch.allclose(got, ref, rtol=1e-6, atol=0), (got, ref)
    for a, b in zip(g_got, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    g_bad = [g.clone() for g in g_got]
    m.model.layers[0].mlp.up_proj.weight.data[0, 0] += 1.0  # the check bites: another model, other gradients
    _, g_other = step(padded)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_other, g_bad))


GPU = dict(env={}, cuda_available=True, bf16_supported=True, gpu_count=1, gpu_gib=80.0, shape=LLAMA2_7B)


def test_layout_takes_graphs_only_where_they_can_capture_the_step():
    on = ["training.cuda_graphs=true"]
    assert layout.decide(recipe.load_recipe("llama2_guanaco_fast", on), **GPU).cuda_graphs
    assert not layout.decide(recipe.load_recipe("llama2_guanaco_fast"), **GPU).cuda_graphs  # off unless asked
    for extra, why in ((["training.gradient_accumulation_steps=2"], "gradient_accumulation_steps > 1"),
                       (["training.gradient_checkpointing=true"], "gradient checkpointing is on"),
                       (["data.packing=false", "data.padding_free=true", "model.attn_implementation=sdpa"],
                        "packed varlen batches")):
        lay = layout.decide(recipe.load_recipe("llama2_guanaco_fast", on + extra), **GPU)
        assert not lay.cuda_graphs and any(n.startswith("training.cuda_graphs off: ") and why in n for n in lay.notes), lay.notes
    cpu = layout.decide(recipe.load_recipe("llama2_guanaco_fast", on), env={}, cuda_available=False, shape=LLAMA2_7B)
    assert not cpu.cuda_graphs and "training.cuda_graphs off: a CPU run" in cpu.notes
    ddp = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "ACCELERATE_MIXED_PRECISION": "bf16"}
    lay = layout.decide(recipe.load_recipe("llama2_guanaco_fast", on), **{**GPU, "env": ddp, "gpu_count": 2})
    assert not lay.cuda_graphs and "training.cuda_graphs off: ddp runs several processes" in lay.notes


def test_auto_graphs_take_the_step_where_they_can_and_stay_silent_elsewhere():
    auto = ["training.cuda_graphs=auto"]
    assert layout.decide(recipe.load_recipe("llama2_guanaco_fast", auto), **GPU).cuda_graphs
    ddp = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "ACCELERATE_MIXED_PRECISION": "bf16"}
    for extra, where in (([], dict(env={}, cuda_available=False, shape=LLAMA2_7B)),  # a CPU run
                         ([], {**GPU, "env": ddp, "gpu_count": 2}),  # two processes
                         (["training.gradient_checkpointing=true"], GPU)):
        lay = layout.decide(recipe.load_recipe("llama2_guanaco_fast", auto + extra), **where)
        assert not lay.cuda_graphs and not any("cuda_graphs" in n for n in lay.notes), lay.notes
    # the memory plan counts the graphs' buffers under auto as under true (tests/test_plan.py: one layer input each)
    on = plan.for_recipe(recipe.load_recipe("llama2_guanaco_fast", ["training.cuda_graphs=true"]), LLAMA2_7B)
    assert plan.for_recipe(recipe.load_recipe("llama2_guanaco_fast", auto), LLAMA2_7B) == on
    assert plan.for_recipe(recipe.load_recipe("llama2_guanaco_fast"), LLAMA2_7B) != on


@pytest.mark.parametrize("bad", ["yes please", "2"])
def test_cuda_graphs_key_is_a_bool_or_auto(bad):
    from lorafit.errors import UserError

    with pytest.raises(UserError, match="training.cuda_graphs"):
        recipe.load_recipe("llama2_guanaco_fast", [f"training.cuda_graphs={bad}"])


def test_dispatch_takes_the_graphs_on_fixed_shape_training_steps_only(monkeypatch, caplog):
    """install() and the per-layer dispatch on the CPU, with torch's capture replaced by a stub that keeps what a graph
    does with its inputs (a CPU has no graphs): it reads its rotary tables and sequence boundaries from the buffers
    it was captured with, copying a tensor in only where it is handed another one. The first fixed-shape training step
    captures once, from copies of its own inputs (layer 0's without grad, the later ones with: LoRA-like trainable
    weights upstream), and every such step goes through the captured callables with the eager loss, also a step with
    other positions and boundaries than the captured one (layer 0 refreshes the buffers all layers share); a no-grad
    forward, an unpadded batch and eval mode stay with the layers' own forwards."""
    m = tiny_llama("varlen").train()
    for n, p in m.named_parameters():
        p.requires_grad_(n.endswith(("q_proj.weight", "v_proj.weight")))
    captured = []

    def as_graph(forward, sample, calls):
        def replay(hidden, *rest):
            calls.append(1)
            for buf, got in zip(sample[1:], rest, strict=True):
                if buf.data_ptr() != got.data_ptr():  # torch's graphed callable copies only such inputs
                    buf.copy_(got)
            return forward(hidden, *sample[1:])

        return replay

    def stub(steps, samples, num_warmup_iters):
        captured.append([s[0].requires_grad for s in samples])
        calls = []
        for step, sample in zip(steps, samples, strict=True):
            step.forward = as_graph(step.forward, sample, calls)
        captured.append(calls)
        return steps

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stub)
    shape = graphs.static_shape(2, 16, [2, 1])
    _, batch = packed([9, 3, 12])
    _, other = packed([5, 11, 8], seed=2)  # other positions and boundaries, the same fixed shape
    for b in (batch, other):
        b.update(labels=b["input_ids"].clone(), use_cache=False)  # as lorafit's compute_loss calls the model
    unpadded = dict(batch)
    assert graphs.pad_batch(batch, shape, pad_id=0) and graphs.pad_batch(other, shape, pad_id=0)
    assert not torch.equal(batch["cu_seq_lens_q"], other["cu_seq_lens_q"])
    with torch.no_grad():
        eager, eager_other = m(**batch).loss, m(**other).loss
    g = graphs.install(m, shape)
    g.device_type = "cpu"
    for b, ref in ((batch, eager), (other, eager_other), (batch, eager)):
        loss = m(**b).loss
        loss.backward()
        assert torch.allclose(loss, ref, rtol=1e-6, atol=0)
    assert captured[0] == [False, True] and len(captured[1]) == 2 * 3 and g.replays == 3  # 2 layers x 3 steps
    with torch.no_grad():
        m(**batch)
    assert not g.said_eager  # evaluation is not a training step that missed the graphs
    with caplog.at_level(logging.WARNING, logger="lorafit"):
        m(**unpadded).loss.backward()
        m(**unpadded).loss.backward()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "CUDA graphs: a training step of 24 tokens did not have the fixed shape (32 tokens, 5 sequences) and ran "
        "without them"]  # once
    m.eval()
    m(**batch)
    assert len(captured) == 2 and len(captured[1]) == 6 and g.replays == 3
