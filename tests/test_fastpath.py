"""The fast path on CPU (lorafit.attention, lorafit.lm_head, lorafit.optim): varlen attention keeps packed rows apart and matches sdpa; the sync-free 32-bit AdamW is
bitsandbytes' AdamW32bit step for step. The CUDA kernel and the GPU optimizer are checked in tests/test_gpu.py."""

import io

import pytest
import torch
from test_trainer_loss import first_batch

from lorafit import attention, layout, optim, recipe, trainer
from lorafit.errors import UserError


def tiny_llama(attn: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # grouped-query attention (4 query heads, 2 key/value heads), as SmolLM2 has
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    ref = LlamaForCausalLM(cfg).eval()
    if attn == "sdpa":
        return ref
    m = LlamaForCausalLM._from_config(cfg, attn_implementation=attention.register_varlen_attention()).eval()
    m.load_state_dict(ref.state_dict())
    attention.skip_mask_building(m)  # as lorafit.model installs it with this attention
    return m


def packed(lens, seed=1):
    """Rows of the given lengths, concatenated as TRL's padding-free collator does (with its boundary kwargs)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 100, (n,), generator=g) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    batch = dict(input_ids=torch.cat(rows)[None], position_ids=torch.cat([torch.arange(n) for n in lens])[None],
                 cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    return rows, batch


def test_packed_rows_attend_only_within_themselves():
    ours, ref = tiny_llama("varlen"), tiny_llama("sdpa")
    assert ours.config._attn_implementation == attention.ATTN_NAME
    rows, batch = packed([5, 9, 1, 3])
    with torch.no_grad():
        got = ours(**batch).logits[0]
        alone = torch.cat([ref(input_ids=r[None]).logits[0] for r in rows])  # each row its own forward
        across = ref(input_ids=batch["input_ids"]).logits[0]  # one causal sequence: rows see earlier rows
    assert torch.allclose(got, alone, atol=1e-5), (got - alone).abs().max()
    assert (across - alone).abs().max() > 1e-2  # the check above would catch attention across rows


def tiny_mistral(attn: str, window: int, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window)
    ref = MistralForCausalLM(cfg).eval()
    if attn == "sdpa":
        return ref
    m = MistralForCausalLM._from_config(cfg, attn_implementation=attention.register_varlen_attention()).eval()
    m.load_state_dict(ref.state_dict())
    attention.skip_mask_building(m)
    return m


@pytest.mark.parametrize("window", [3, 64])
def test_a_sliding_window_is_applied_in_packed_rows_as_transformers_applies_it(window, monkeypatch):
    """Mistral's sliding window: each packed row attended with the window (3 tokens here: shorter than the rows, so
    it cuts) equals the row run alone through transformers' own sliding-window mask; a window longer than every
    row (64) is no window at all, and the batch still skips transformers' mask building (the Mistral gap)."""
    import transformers.masking_utils as mu

    ours, ref = tiny_mistral("varlen", window), tiny_mistral("sdpa", window)
    rows, batch = packed([5, 9, 1, 7])
    built = []
    real = mu.find_packed_sequence_indices
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    with torch.no_grad():
        got = ours(**batch, use_cache=False).logits[0]
    monkeypatch.undo()
    with torch.no_grad():
        alone = torch.cat([ref(input_ids=r[None], use_cache=False).logits[0] for r in rows])
    assert torch.allclose(got, alone, atol=1e-5), (got - alone).abs().max()
    assert built == []  # the placeholder mask went in: nothing built, nothing inspected
    if window == 3:  # the window matters here: full causal attention within the rows gives other logits
        full = tiny_mistral("sdpa", None)
        with torch.no_grad():
            causal = torch.cat([full(input_ids=r[None], use_cache=False).logits[0] for r in rows])
        assert (causal - alone).abs().max() > 1e-3


def test_packed_batches_skip_transformers_mask_building(monkeypatch):
    """A training forward of a packed batch (no KV cache) goes past transformers' packed-row detection, whose `.all()`
    is a host-device sync on a GPU, with the logits it gets without the hook; a padded batch still gets
    transformers' mask. Without the hook transformers does run the detection here (so the check below can fail)."""
    import transformers.masking_utils as mu

    ours, plain = tiny_llama("varlen"), tiny_llama("sdpa")
    plain = LlamaForCausalLM_with(plain.config, attention.register_varlen_attention(), plain.state_dict())
    rows, batch = packed([5, 9, 1, 3])
    batch["use_cache"] = False
    calls = []
    real = mu.find_packed_sequence_indices
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda p: calls.append(p) or real(p))
    with torch.no_grad():
        want = plain(**batch).logits
        assert len(calls) == 1  # transformers' detection ran for the model without the hook
        got = ours(**batch).logits
        assert len(calls) == 1, "the hooked model ran transformers' packed-row detection"
        assert torch.equal(got, want)
        ids, mask = torch.stack([rows[1], rows[1]]), torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
        ours(input_ids=ids, attention_mask=mask, use_cache=False)  # padded: transformers builds sdpa's mask
        ours.train()
        ours.config.attention_dropout = 0.5  # the varlen kernel takes no dropout: the batch keeps the sdpa path
        ours(**batch)


def LlamaForCausalLM_with(cfg, attn, state):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()
    m.load_state_dict(state)
    return m


def test_batches_without_boundaries_fall_back_to_sdpa():
    """Padded batches (evaluation) and decoding with a KV cache (sample answers) take transformers' sdpa path with
    the mask transformers builds for sdpa."""
    ours, ref = tiny_llama("varlen"), tiny_llama("sdpa")
    rows, _ = packed([9, 5])
    ids = torch.stack([rows[0], torch.cat([rows[1], torch.zeros(4, dtype=torch.long)])])
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)
        left = dict(input_ids=ids.flip(1), attention_mask=mask.flip(1), max_new_tokens=6, do_sample=False)
        assert torch.equal(ours.generate(**left), ref.generate(**left))


def test_varlen_training_loss_is_the_padded_batches_loss(tmp_path, tiny_llama_dir, guanaco_dir):
    """Through lorafit's own assembly (recipe -> layout -> data/model -> trainer): padding-free batches with varlen
    attention give the padded batches' loss (float32: only the summation order differs)."""
    losses = {}
    for extra in ([], ["data.padding_free=true", "model.attn_implementation=varlen"]):
        sft, net, batch, _ = first_batch(tmp_path, tiny_llama_dir, guanaco_dir, extra)
        assert net.config._attn_implementation == (attention.ATTN_NAME if extra else "sdpa")
        assert ("cu_seq_lens_q" in batch) == bool(extra)
        with torch.no_grad():
            losses[bool(extra)] = sft.compute_loss(net, dict(batch)).item()
        if extra:  # lorafit.model installed skip_mask_building: no packed-row detection in a training forward
            import transformers.masking_utils as mu

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(mu, "find_packed_sequence_indices", lambda p: pytest.fail("transformers inspected the "
                                                                                     "position ids"))
                with torch.no_grad():
                    sft.compute_loss(net, dict(batch))
    assert abs(losses[True] - losses[False]) <= 1e-5 * abs(losses[False]), losses


def test_the_recipe_refuses_varlen_without_padding_free_batches():
    with pytest.raises(UserError, match="model.attn_implementation=varlen runs on padding-free batches"):
        recipe.load_recipe("llama2_guanaco", ["model.attn_implementation=varlen"])
    fast = recipe.load_recipe("llama2_guanaco_fast")
    assert fast.model.attn_implementation == "varlen" and fast.data.packing
    assert layout.decide(fast, env={}, cuda_available=False).attn_implementation == attention.ATTN_NAME


def adamw_pair(monkeypatch, device="cpu", n=3, drop=None, reload_after=None):
    """bitsandbytes' PagedAdamW32bit and lorafit's AdamW32bitNoSync stepped n times from the same bf16 parameters
    with the same gradients: two groups as HF builds them (weight decay 0.001 on a 400 x 300 tensor, above
    bitsandbytes' 1e5 paging threshold, and a 64 x 48 one; none on two vectors). `drop=(step, i)` leaves parameter i
    without a gradient at that step (0-based); `reload_after=k` saves ours after step k and continues in a fresh
    optimizer loaded from that state dict, as a resume does. Returns {"bnb" | "ours": (parameters, optimizer, how
    many times its steps called bitsandbytes' sync_gpu, how many update kernels it launched)}. tests/test_gpu.py
    runs it on CUDA."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import bitsandbytes.optim.optimizer as bnb_opt

    real_sync, real_update = bnb_opt.sync_gpu, bnbf.optimizer_update_32bit
    torch.manual_seed(0)
    shapes = [(400, 300), (64, 48), (64,), (32,)]
    base = [torch.randn(sh, device=device, dtype=torch.bfloat16) for sh in shapes]
    grads = [[torch.randn_like(b) for b in base] for _ in range(n)]
    out = {}
    for name, cls in (("bnb", bnb.optim.PagedAdamW32bit), ("ours", optim.adamw_32bit_nosync())):
        ps = [torch.nn.Parameter(b.clone()) for b in base]

        def make(ps=ps, cls=cls):
            return cls([{"params": ps[:2], "weight_decay": 0.001}, {"params": ps[2:], "weight_decay": 0.0}],
                       lr=2e-3, betas=(0.9, 0.999), eps=1e-8)

        opt = make()
        syncs, updates = [], []
        monkeypatch.setattr(bnb_opt, "sync_gpu", lambda t, syncs=syncs: (syncs.append(t), real_sync(t)))
        monkeypatch.setattr(bnbf, "optimizer_update_32bit",
                            lambda *a, updates=updates, **k: (updates.append(1), real_update(*a, **k))[1])
        for k, gs in enumerate(grads):
            for i, (p, g) in enumerate(zip(ps, gs)):
                p.grad = None if drop == (k, i) else g.clone()
            opt.step()
            if name == "ours" and reload_after == k + 1:  # through torch.save and torch.load, as HF's optimizer.pt
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = make()
                opt.load_state_dict(torch.load(buf, weights_only=False))
        if device != "cpu":
            torch.cuda.synchronize()  # host-device sync: the results are read next
        out[name] = (ps, opt, len(syncs), len(updates))
    return out


def assert_same_adamw(res, steps):
    (pb, ob, _, _), (po, oo, _, _) = res["bnb"], res["ours"]
    assert all(torch.equal(a, b) for a, b in zip(pb, po))  # the same kernel on the same inputs: bit-identical
    for a, b in zip(pb, po):
        assert oo.state[b]["state1"].dtype == torch.float32  # 32-bit moments for bf16 LoRA weights, as paged's
        assert torch.equal(ob.state[a]["state1"].cpu(), oo.state[b]["state1"].cpu())
        assert torch.equal(ob.state[a]["state2"].cpu(), oo.state[b]["state2"].cpu())
        assert oo.state[b]["step"] == ob.state[a]["step"] == steps[b.shape]
    assert not getattr(oo.state[po[0]]["state1"], "is_paged", False)


def test_sync_free_adamw_is_bitsandbytes_adamw_32bit_step_for_step(monkeypatch):
    res = adamw_pair(monkeypatch)
    assert_same_adamw(res, {sh: 3 for sh in [(400, 300), (64, 48), (64,), (32,)]})
    # bitsandbytes launches one update per tensor per step; ours one per group (2 groups of 2 tensors here)
    assert res["bnb"][3] == 4 * 3 and res["ours"][3] == 2 * 3


def test_sync_free_adamw_with_a_missing_gradient_and_a_resume(monkeypatch):
    """A step where one tensor has no gradient (bitsandbytes leaves it untouched: its group takes the per-tensor path
    from then on, as its tensors' step counts differ), and a state dict saved and loaded between steps."""
    res = adamw_pair(monkeypatch, n=4, drop=(1, 3), reload_after=2)
    assert_same_adamw(res, {(400, 300): 4, (64, 48): 4, (64,): 4, (32,): 3})
    # ours: group 0 flat at every step (4); group 1 flat at step 1 (1), per-tensor at steps 2-4 (1 + 2 + 2)
    assert res["ours"][3] == 4 + 1 + 1 + 2 + 2


def test_sync_free_adamw_never_synchronizes(monkeypatch):
    res = adamw_pair(monkeypatch, n=2)
    # bitsandbytes' own step synchronizes after each of its 4 tensors (+1 at the end when paged), at each of 2 steps;
    # ours never
    assert res["bnb"][2] == 10 and res["ours"][2] == 0


def test_recipe_optimizer_reaches_hf_as_a_class(tmp_path, tiny_llama_dir, guanaco_dir):
    sft, net, _, _ = first_batch(tmp_path, tiny_llama_dir, guanaco_dir, ["training.optimizer=lorafit_adamw_32bit"])
    opt = sft.create_optimizer()
    assert type(opt).__name__ == "AdamW32bitNoSync" and not opt.is_paged
    n_lora = sum(p.requires_grad for p in net.parameters())
    per_decay = {g["weight_decay"]: len(g["params"]) for g in opt.param_groups}
    assert per_decay.get(0.001) == n_lora and not per_decay.get(0.0)  # HF's grouping: LoRA A/B all decay
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4) and opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(UserError, match="did you mean"):
        trainer.check_optimizer("lorafit_adamw_32")
