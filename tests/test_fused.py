"""lorafit.fused on CPU: the fused 4-bit LoRA layers compute PEFT's forward and gradients, dropout included, and hand
no-grad calls (evaluation, generation) to bitsandbytes' and PEFT's own forward. The CUDA check is in tests/test_gpu.py.

The reference for every number is PEFT's definition of a LoRA layer over a 4-bit base:
    y = x W^T + scale * B (A (dropout(x))),   W = bitsandbytes' dequantized NF4 weight, scale = alpha / r.
"""

import pytest
import torch
from test_trainer_loss import first_batch

from lorafit import fused, layout, model, recipe


def load(tiny_llama_dir, *sets, dropout=0.0):
    """The tiny Llama as lorafit.model loads it for llama2_guanaco on CPU, in float32 (tight comparisons), without
    recompute unless `sets` asks for it, with every lora_B drawn at random (PEFT starts it at zero, which would hide a
    wrong scale or a missing LoRA term)."""
    cfg = recipe.load_recipe("llama2_guanaco", [f"model.name={tiny_llama_dir}", "quantization.compute_dtype=float32",
                                                f"lora.dropout={dropout}", "training.gradient_checkpointing=false",
                                                *sets])
    lay = layout.decide(cfg, env={}, cuda_available=False)
    tok = model.load_tokenizer(cfg, str(tiny_llama_dir))
    net = model.load_model(cfg, lay, str(tiny_llama_dir), tok)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.train()


def batch(n=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, n), generator=g)
    return dict(input_ids=ids, labels=ids.clone())


def loss_and_grads(net, b):
    net.zero_grad()
    loss = net(**b).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


def count_calls(monkeypatch):
    """Each run of the fused autograd function (its forward is looked up on the class at each apply): a list with
    "lora" or "frozen" per call."""
    fn = fused._function_class()
    calls = []
    real = fn.forward
    monkeypatch.setattr(fn, "forward", staticmethod(
        lambda ctx, x, a, *r: (calls.append("frozen" if a is None else "lora"), real(ctx, x, a, *r))[1]))
    return calls


@pytest.mark.parametrize("double_quant", [False, True])  # bitsandbytes' op called directly; its wrapper (nested)
def test_fused_model_has_peft_loss_and_gradients(tiny_llama_dir, monkeypatch, double_quant):
    dq = f"quantization.double_quant={double_quant}"
    ref, ours = load(tiny_llama_dir, dq), load(tiny_llama_dir, "lora.fused=true", dq)
    assert {m.weight.quant_state.nested for m in ours.modules() if type(m).__name__ == "FusedFrozen4bit"} == {
        double_quant}
    kinds = {type(m).__name__ for m in ours.modules()}
    assert {"FusedLoRA4bit", "FusedFrozen4bit"} <= kinds and "FusedLoRA4bit" not in {type(m).__name__
                                                                                       for m in ref.modules()}
    calls = count_calls(monkeypatch)
    b = batch()
    l_ref, g_ref = loss_and_grads(ref, b)
    l_ours, g_ours = loss_and_grads(ours, b)
    # 2 layers x (q, v with LoRA + k, o, gate, up, down frozen) = 14 fused linears per forward
    assert calls.count("lora") == 4 and calls.count("frozen") == 10
    assert l_ours == pytest.approx(l_ref, rel=1e-5)
    assert g_ref.keys() == g_ours.keys() and len(g_ref) == 8  # A and B of q, v in 2 layers
    for n in g_ref:
        assert torch.allclose(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-7), (n, (g_ours[n] - g_ref[n]).abs().max())
    # the comparison can tell: without the LoRA term the loss moves by far more than the tolerance above
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.zero_()
        assert abs(ours(**b).loss.item() - l_ref) > 1e-3 * abs(l_ref)


def test_fused_dropout_matches_the_definition(tiny_llama_dir):
    """One fused q_proj with p = 0.3 against y = x W^T + s B A (x * mask / (1 - p)), with the mask of the same seeded
    torch.native_dropout call; forward and the gradients of x, A and B."""
    import bitsandbytes.functional as bnbf

    net = load(tiny_llama_dir, "lora.fused=true", dropout=0.3)
    layer = net.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "FusedLoRA4bit"
    p, s = 0.3, layer.scaling["default"]
    assert s == pytest.approx(16 / 64)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    x = torch.randn(2, 5, a.shape[1], requires_grad=True)
    gy = torch.randn(2, 5, b.shape[0])
    torch.manual_seed(11)
    y = layer(x)
    y.backward(gy)
    got = (y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())

    w = bnbf.dequantize_4bit(layer.base_layer.weight, layer.base_layer.weight.quant_state)
    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    torch.manual_seed(11)
    _, mask = torch.native_dropout(x2.detach().reshape(-1, x2.shape[-1]), p, True)
    ref = x2 @ w.t() + s * ((x2 * mask.view(x2.shape) / (1 - p)) @ a2.t()) @ b2.t()
    ref.backward(gy)
    for g, r in zip(got, (ref.detach(), x2.grad, a2.grad, b2.grad)):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6), (g - r).abs().max()
    assert 0 < (~mask).sum() < mask.numel()  # some inputs were dropped, some kept


def test_recompute_replays_the_dropout_masks(tiny_llama_dir):
    """Gradient checkpointing re-runs each layer's forward in the backward; torch's checkpoint restores the RNG
    state, so the fused dropout draws the same masks and the gradients are those of the run without recompute."""
    b = batch()
    plain = load(tiny_llama_dir, "lora.fused=true", dropout=0.3)
    gc = load(tiny_llama_dir, "lora.fused=true", "training.gradient_checkpointing=true", dropout=0.3)
    torch.manual_seed(5)  # after loading: lorafit.model seeds torch when it draws the LoRA weights
    l_plain, g_plain = loss_and_grads(plain, b)
    torch.manual_seed(5)
    l_gc, g_gc = loss_and_grads(gc, b)
    torch.manual_seed(6)
    l_other, _ = loss_and_grads(plain, b)
    assert l_gc == pytest.approx(l_plain, rel=1e-6)
    assert all(torch.allclose(g_gc[n], g_plain[n], rtol=1e-5, atol=1e-7) for n in g_plain)
    assert abs(l_other - l_plain) > 1e-4 * abs(l_plain)  # other masks, another loss: the masks above were the same


def test_kept_weights_give_the_same_gradients(tiny_llama_dir):
    b = batch()
    l_re, g_re = loss_and_grads(load(tiny_llama_dir, "lora.fused=true"), b)
    l_keep, g_keep = loss_and_grads(load(tiny_llama_dir, "lora.fused=true", "quantization.keep_dequantized=true"), b)
    assert l_keep == l_re
    assert all(torch.equal(g_keep[n], g_re[n]) for n in g_re)  # the same dequantized weight, kept instead of redone


def test_no_grad_calls_take_the_libraries_forward(tiny_llama_dir, monkeypatch):
    """Evaluation and generation run without grad: bitsandbytes' inference path, bit-identical to the plain model."""
    ref, ours = load(tiny_llama_dir).eval(), load(tiny_llama_dir, "lora.fused=true").eval()
    calls = count_calls(monkeypatch)
    ids = batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
        gen = dict(input_ids=ids[:, :4], max_new_tokens=5, do_sample=False)
        assert torch.equal(ours.generate(**gen), ref.generate(**gen))
    assert calls == []


def test_disabled_adapters_fall_back(tiny_llama_dir, monkeypatch):
    ours, ref = load(tiny_llama_dir, "lora.fused=true"), load(tiny_llama_dir)
    calls = count_calls(monkeypatch)
    b = batch()
    with ours.disable_adapter(), ref.disable_adapter():
        lo, lr = ours(**b).loss, ref(**b).loss
    assert lo.item() == pytest.approx(lr.item(), rel=1e-5)
    assert calls == ["frozen"] * 14  # the frozen linears and the LoRA layers' base layers, without their LoRA half


@pytest.mark.parametrize("compute", ["bfloat16", "float32"])
def test_trainer_step_takes_the_fused_path(tmp_path, tiny_llama_dir, guanaco_dir, monkeypatch, compute):
    """Through lorafit's own assembly, with the bf16 adapters TRL casts to: bf16 activations (a GPU run's dtypes, on
    the CPU) and float32 ones (the CPU test runs, where the fused layer computes the adapter in float32 and PEFT in
    bf16). Both give PEFT's loss within bf16 rounding, with every layer fused."""
    losses, grads = {}, {}
    for on in (False, True):
        sft, net, b, _ = first_batch(tmp_path / str(on), tiny_llama_dir, guanaco_dir,
                                     [f"lora.fused={str(on).lower()}", f"quantization.compute_dtype={compute}"])
        assert all(p.dtype == torch.bfloat16 for p in net.parameters() if p.requires_grad)
        calls = count_calls(monkeypatch)
        loss = sft.compute_loss(net, dict(b))
        loss.backward()
        # 2 layers: 4 LoRA layers and 10 frozen ones in the forward, 12 again in the recompute (the recipe
        # checkpoints; torch's non-reentrant checkpoint stops re-running a layer once its saved tensors are back)
        assert (calls.count("lora") >= 4 and calls.count("frozen") >= 10) if on else not calls
        assert fused.counts(net) == ({"lora": 4, "frozen": 14} if on else {"lora": 0, "frozen": 0})
        losses[on] = loss.item()
        grads[on] = {n: p.grad.float() for n, p in net.named_parameters() if p.requires_grad}
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)
    # PEFT starts lora_B at zero, so A's gradients are zero on both sides and B's carry the comparison
    b_names = [n for n in grads[False] if "lora_B" in n]
    assert len(b_names) == 4
    for n in b_names:
        ref = grads[False][n]
        assert ref.norm() > 0 and (grads[True][n] - ref).norm() / ref.norm() < 2e-2, n


def peft_pair(device, dtype, n_in=256, n_out=384, r=16, dropout=0.0, seed=0):
    """One bitsandbytes NF4 linear wrapped by PEFT's LoRA twice, from the same weights: (PEFT's, fused). lora_B is
    drawn at random and the adapters are cast to `dtype`, as TRL does. tests/test_gpu.py runs it on CUDA at a 7B
    layer's size."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        is_loaded_in_4bit = True  # what PEFT reads to dispatch its 4-bit LoRA layer

        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=dtype, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * 0.02
    b_init = torch.randn(n_out, r, generator=g) * 0.05
    nets = []
    for _ in range(2):
        one = One()
        one.proj.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
        one = one.to(device)  # bitsandbytes quantizes on the move
        torch.manual_seed(seed + 1)  # the same lora_A draw in both
        net = get_peft_model(one, LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules=["proj"]))
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.data = b_init.clone()
            if p.requires_grad:
                p.data = p.data.to(device=device, dtype=dtype)
        nets.append(net.train())
    assert fused.install(nets[1]) == {"lora": 1, "frozen": 1}  # the wrapper and its base layer
    return nets


def output_and_grads(net, x):
    """net(x) and the gradients of sum(y^2), taken in float32, with respect to x and each trainable weight:
    (y, dx, *weight grads), on a fresh leaf copy of x."""
    xi = x.clone().requires_grad_(True)
    y = net(xi)
    y.float().square().sum().backward()  # float() is y itself for a float32 output
    return (y.detach(), xi.grad, *[p.grad for p in net.parameters() if p.requires_grad])


def test_single_layer_pair_agrees(monkeypatch):
    ref, ours = peft_pair("cpu", torch.float32)
    calls = count_calls(monkeypatch)
    x = torch.randn(3, 7, 256)
    ys = [output_and_grads(net, x) for net in (ref, ours)]
    assert len(calls) == 1
    for a, b in zip(*ys):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
