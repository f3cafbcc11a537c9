"""lorafit's lean training loss is TRL's loss, minus the per-step metric syncs."""

import torch
from conftest import tiny_overrides

from lorafit import data, layout, model, recipe, trainer
from lorafit.run import summary


def sets_for(tmp_path, tiny_llama_dir, guanaco_dir) -> list[str]:
    """The tiny CPU run's overrides as recipe.load_recipe takes them (k=v, without the CLI's --set)."""
    return [v for v in tiny_overrides(tiny_llama_dir, guanaco_dir, tmp_path / "run") if v != "--set"]


def first_batch(tmp_path, tiny_llama_dir, guanaco_dir, extra: list[str]):
    """llama2_guanaco on the tiny model on CPU, assembled as src/train.py does: (trainer, model, first batch, its real
    token count). Dropout is off so that two calls see the same arithmetic."""
    sets = sets_for(tmp_path, tiny_llama_dir, guanaco_dir) + ["lora.dropout=0.0", *extra]
    cfg = recipe.load_recipe("llama2_guanaco", sets)
    lay = layout.decide(cfg, env={}, cuda_available=False)
    args = trainer.build_args(cfg, lay, str(tmp_path / "run"), has_eval=False)
    tok = model.load_tokenizer(cfg, str(tiny_llama_dir))
    prepared = data.prepare(cfg.data, tok)
    net = model.load_model(cfg, lay, str(tiny_llama_dir), tok)
    sft = trainer.build_trainer(cfg, lay, args, net, tok, prepared, [])
    batch = next(iter(sft.get_train_dataloader()))
    real = batch.pop(trainer.REAL_TOKENS_KEY)
    net.train()
    return sft, net, batch, real


def test_lean_loss_equals_trl_loss(tmp_path, tiny_llama_dir, guanaco_dir):
    sft, net, batch, _ = first_batch(tmp_path, tiny_llama_dir, guanaco_dir, [])
    with torch.no_grad():
        lean = sft.compute_loss(net, dict(batch))
        sft.token_metrics = True  # routes to TRL's own compute_loss
        trl = sft.compute_loss(net, dict(batch))
    # Same fused LM head and the same reduction: identical up to float32 summation order (exact on CPU in practice).
    assert torch.allclose(lean, trl, rtol=1e-6, atol=1e-6), (lean.item(), trl.item())
    assert "entropy" in sft._metrics["train"]  # the TRL path did log its metrics; the lean one did not before it


def test_steady_figures_skip_warm_up_and_weight_the_mean_by_time():
    hist = [
        {"loss": 9.0},  # not a timed log
        {"tokens_per_second": 10.0, "step_time": 9.0},  # warm-up: skipped
        {"tokens_per_second": 20.0, "step_time": 5.0},  # compilation: skipped
        {"tokens_per_second": 1000.0, "step_time": 1.0, "mfu": 0.5},
        {"tokens_per_second": 3000.0, "step_time": 2.0, "mfu": 0.7},
        {"tokens_per_second": 2000.0, "step_time": 1.0, "mfu": 0.6},
    ]
    got = summary.steady_figures(hist)
    assert got["steady_tokens_per_second"] == 2000.0  # median of 1000, 3000, 2000
    assert got["steady_step_time_s"] == 1.0
    assert got["steady_mfu"] == 0.6
    # tokens 1000*1 + 3000*2 + 2000*1 = 9000 over 4 s
    assert got["steady_tokens_per_second_mean"] == 2250.0
    assert summary.steady_figures(hist[:3]) == {}  # nothing after the warm-up


def test_padding_free_batches_give_the_padded_batches_loss(tmp_path, tiny_llama_dir, guanaco_dir):
    """data.padding_free concatenates a micro-batch's rows into one sequence (position ids restart per row, no
    attention across rows): the same rows and answer tokens as the padded batch, so the same loss. Float32 on CPU:
    only the summation order differs (the attention mask is block-diagonal instead of a padding mask)."""
    losses, shapes = {}, {}
    for pf in (False, True):
        sft, net, batch, real = first_batch(tmp_path, tiny_llama_dir, guanaco_dir, [f"data.padding_free={pf}"])
        shapes[pf] = (tuple(batch["input_ids"].shape), real)
        with torch.no_grad():
            losses[pf] = sft.compute_loss(net, dict(batch)).item()
    (padded_shape, real), (flat_shape, real_flat) = shapes[False], shapes[True]
    assert real == real_flat and padded_shape[0] == 2  # the same two rows ...
    assert flat_shape == (1, real)  # ... as one sequence of exactly their tokens, no pad
    assert abs(losses[True] - losses[False]) <= 1e-5 * abs(losses[False]), losses


def test_levers_reach_trl_as_documented(tmp_path, tiny_llama_dir, guanaco_dir):
    """padding_free goes to TRL with max_length unset (lorafit.data already truncated the rows, and TRL refuses a
    max_length it cannot enforce without packing); with packing TRL keeps max_length. Activation offloading is a GPU
    lever: the lean recipe turns it on, and a CPU run leaves it off."""
    assert recipe.load_recipe("llama2_guanaco_lean").training.activation_offloading is True
    sets = sets_for(tmp_path, tiny_llama_dir, guanaco_dir)

    def args(*extra):
        cfg = recipe.load_recipe("llama2_guanaco", sets + list(extra))
        return trainer.build_args(cfg, layout.decide(cfg, env={}, cuda_available=False), str(tmp_path / "run"),
                                  has_eval=False)

    a = args("data.padding_free=true", "training.activation_offloading=true")
    assert a.padding_free is True and a.max_length is None and a.activation_offloading is False
    a = args("data.padding_free=true", "data.packing=true")
    assert a.padding_free is True and a.packing is True and a.max_length == 128
    a = args()
    assert a.padding_free is False and a.max_length == 128


def test_host_shortcuts_give_hf_trainers_own_figures(tmp_path, tiny_llama_dir, guanaco_dir):
    """LorafitTrainer counts the parameters for HF's FLOPs figure once, and clips over the LoRA tensors alone (both
    to cut per-step host time on the GPU). Each must give what HF's own per-step path gives."""
    from transformers import Trainer

    sft, net, batch, _ = first_batch(tmp_path, tiny_llama_dir, guanaco_dir, [])
    # HF's formula: 6 x input tokens x non-embedding parameters
    want = 6 * batch["input_ids"].numel() * net.num_parameters(exclude_embeddings=True)
    assert sft.floating_point_ops(batch) == want == Trainer.floating_point_ops(sft, batch)
    assert sft.floating_point_ops({"labels": batch["input_ids"]}) == 0  # no model input: HF counts nothing either

    loss = sft.compute_loss(net, dict(batch))
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    sft.args.max_grad_norm = 1e-3  # small enough that clipping scales the gradients
    ours = sft._clip_grad_norm(net)
    ours_grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    for p, g in zip([p for p in net.parameters() if p.grad is not None], grads):
        p.grad.copy_(g)  # back to the unclipped gradients
    hf = Trainer._clip_grad_norm(sft, net)
    assert torch.allclose(ours, hf) and ours.item() > 1e-3  # same total norm, and above the clip threshold
    hf_grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, hf_grads))  # clipped identically


def test_indexed_lm_head_gives_trls_loss_and_gradients(tmp_path, tiny_llama_dir, guanaco_dir):
    """The indexed LM head (lorafit.lm_head: labelled positions listed by the collator on the host, gathered with
    index_select) against TRL's fused head on the same batch: the same loss and the same LoRA gradients, for padded
    and for padding-free batches, and with HF's num_items_in_batch (gradient accumulation's denominator)."""
    from lorafit import lm_head

    for extra in ([], ["data.padding_free=true"]):
        sft, net, batch, _ = first_batch(tmp_path, tiny_llama_dir, guanaco_dir, extra)
        assert sft.indexed_lm_head
        idx = batch.pop(lm_head.LABEL_INDEX_KEY)
        labels = batch["labels"]
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # PEFT starts lora_B at zero, which would leave every lora_A gradient zero
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        # the host's list is the shifted labels' positions: (rows x (length - 1)), the ones not -100
        assert torch.equal(idx, (labels[:, 1:].reshape(-1) != -100).nonzero().squeeze(1))
        assert 0 < idx.numel() < labels[:, 1:].numel()  # some positions are prompt or padding: the index matters

        def run(net=net, batch=batch, **kw):
            net.zero_grad(set_to_none=True)
            out = net(**batch, use_cache=False, **kw)
            loss = out.loss if "lorafit_label_index" in kw else -out.log_probs.sum() / out.label_mask.sum()
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

        (ours, g_ours), (ref, g_ref) = run(lorafit_label_index=idx), run(fused_lm_head=True)
        assert g_ours and len(g_ours) == len(g_ref) and all(b.abs().max() > 0 for b in g_ref)
        assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6), (ours.item(), ref.item())
        for a, b in zip(g_ours, g_ref):
            # float32 compute, but TRL keeps the adapters (so their gradients) in bf16 here: one bf16 rounding of a
            # differently ordered sum apart, relative error ~2^-8 per element at most
            assert (a.float() - b.float()).norm() <= 4e-3 * b.float().norm(), (a - b).abs().max()
        with torch.no_grad():
            n = torch.tensor(3 * idx.numel())  # as if two more micro-batches shared the step
            scaled = net(**batch, use_cache=False, lorafit_label_index=idx, num_items_in_batch=n).loss
        assert torch.allclose(scaled * 3, ref, rtol=1e-6)


def test_indexed_lm_head_stays_off_where_trls_head_does_more(tmp_path, tiny_llama_dir, guanaco_dir):
    """A logit softcap (Gemma 2) or scale (Cohere) changes what the head computes: the wrapper is not installed and
    the collator lists nothing; under ZeRO-3 the layout turns it off (the head's weight is sharded)."""
    from lorafit import lm_head

    sft, net, batch, _ = first_batch(tmp_path, tiny_llama_dir, guanaco_dir, [])
    base = net.get_base_model()
    base.config.final_logit_softcapping = 30.0
    assert lm_head.install_indexed_lm_head(base) is False
    base.config.final_logit_softcapping = None
    cfg = recipe.load_recipe("llama2_guanaco", sets_for(tmp_path, tiny_llama_dir, guanaco_dir))
    assert layout.decide(cfg, env={}, cuda_available=False).indexed_lm_head is True
