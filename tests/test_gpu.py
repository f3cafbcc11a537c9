"""GPU tier (marker `gpu`, run on the device box only): the real CLI on CUDA with bf16 compute and the paged optimizer.

    . .gpu/env.sh; CUDA_VISIBLE_DEVICES=0 python3 -m pytest -m gpu tests/test_gpu.py        # one GPU: every test
    . .gpu/env.sh; CUDA_VISIBLE_DEVICES=0,1 python3 -m pytest -m gpu tests/test_gpu.py      # the re-paging test then
                                                                                            # restores onto GPU 1
The CLI tests pin their child process to the first visible GPU (lorafit refuses one process that sees several); the
in-process layout test needs exactly one visible GPU.
"""

import os

import pytest
from conftest import read_scalars, read_summary, run_cli, tiny_overrides

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("recipe,optimizer,extra,says", [
    ("llama2_guanaco", "paged_adamw_32bit", [], None),
    ("llama2_guanaco_fast", "paged_adamw_32bit", [], None),
    ("llama2_guanaco_fast", "lorafit_adamw_32bit", [], None),
    ("llama2_guanaco_fast", "lorafit_adamw_32bit", ["quantization.dequant_kernel=triton"], "Triton dequantize"),
    ("llama2_guanaco_fast", "lorafit_adamw_32bit", ["training.cuda_graphs=true", "data.eval_fraction=0.25", "training.eval_steps=2"],  # evaluation between
     "CUDA graphs: captured 2 decoder layers")])  # graphed steps runs eagerly
def test_cli_trains_on_gpu_bf16(tmp_path, tiny_llama_dir, guanaco_dir, recipe, optimizer, extra, says):
    out = tmp_path / "run"
    sets = tiny_overrides(tiny_llama_dir, guanaco_dir, out, steps=4)
    # back to the recipe's own GPU settings: bf16 compute, its optimizer (the fast recipe: varlen attention too)
    sets += ["--set", "quantization.compute_dtype=bfloat16", "--set", f"training.optimizer={optimizer}"]
    sets += [x for e in extra for x in ("--set", e)]
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    r = run_cli(["--recipe", recipe, *sets], env={"CUDA_VISIBLE_DEVICES": first})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if says:  # lorafit.model logs the kernel the fused layers run; lorafit.graphs what it captures
        assert says in r.stdout + r.stderr
    s = read_summary(out)
    assert s["steps"] == 4 and s["layout"] == "single"
    assert s["peak_gpu_memory_gib"] > 0
    assert "train/mfu" in read_scalars(out / "tb")  # H100/H200 have a known peak; MFU is logged every step


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="lorafit refuses one process that sees several GPUs")
def test_layout_places_4bit_model_on_local_gpu(tiny_llama_dir):
    import bitsandbytes as bnb

    from lorafit import layout, model, recipe

    cfg = recipe.load_recipe("llama2_guanaco", [f"model.name={tiny_llama_dir}", "lora.r=8"])
    lay = layout.decide(cfg)
    assert lay.device_map == {"": 0}
    tok = model.load_tokenizer(cfg, str(tiny_llama_dir))
    net = model.load_model(cfg, lay, str(tiny_llama_dir), tok)
    linears = [m for m in net.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.device.type == "cuda" for m in linears)
    assert all(m.weight.quant_state.dtype == torch.bfloat16 for m in linears)
    # the layout's sdpa policy (lorafit.layout: a cuDNN plan per new padded shape) is in force after the load
    assert torch.backends.cuda.cudnn_sdp_enabled() is False


def test_restored_paged_optimizer_state_is_paged_again_on_the_last_gpu(tmp_path):
    """The DDP resume failure (bitsandbytes 'Error invalid argument ... pythonInterface.cpp' on rank 1): state saved
    from GPU 0's paged buffers, restored onto another GPU as HF does under DDP. repage_optimizer_state must give
    every large state tensor a fresh paged buffer for its parameter's device, with the same values, and the
    optimizer must step afterwards."""
    import bitsandbytes as bnb

    from lorafit import optim

    dev = torch.device("cuda", torch.cuda.device_count() - 1)

    def fresh(device):
        p = torch.nn.Parameter(torch.zeros(400, 300, device=device))  # over bitsandbytes' 1e5 paging threshold
        return p, bnb.optim.PagedAdamW32bit([p], lr=1e-3)

    p, opt = fresh("cuda:0")
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["state1"].is_paged and opt.state[p]["state1"].page_deviceid == 0
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    p2, opt2 = fresh(dev)
    opt2.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True, map_location=dev))
    assert optim.repage_optimizer_state(opt2) == 2  # state1 and state2
    for k in ("state1", "state2"):
        t = opt2.state[p2][k]
        assert t.is_paged and t.page_deviceid == dev.index
        assert torch.equal(t, opt.state[p][k].cpu())
    p2.grad = torch.ones_like(p2)
    opt2.step()
    torch.cuda.synchronize()
    assert torch.isfinite(p2).all() and not torch.equal(p2.detach().cpu(), torch.zeros(400, 300))


@pytest.mark.parametrize(
    "heads,kv_heads,dim,window",
    # Llama-2-7B; SmolLM2-135M (GQA); Mistral's grouped 32/8 heads with a window (64) shorter than three of the rows
    [(32, 32, 128, None), (9, 3, 64, None), (32, 8, 128, 64)],
)
def test_varlen_kernel_matches_each_row_attended_alone(heads, kv_heads, dim, window):
    """lorafit.attention's CUDA path (torch's varlen flash kernel) against each packed row attended alone by sdpa in
    float32, forward and backward. bf16 operands: relative error between 1e-3 and 1e-2 expected (METHOD.md). With a
    sliding window the reference masks each token to itself and the `window - 1` before it (transformers' rule), so
    an off-by-one in the kernel's window_size would fail: these inputs through the reference with windows 63 and 65
    differ from window 64 by 0.105 and 0.103 (computed on CPU), ten times the tolerance."""
    from lorafit import attention

    lens = [700, 1, 300, 1024, 57]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(h):
        return torch.randn(sum(lens), h, dim, device="cuda", dtype=torch.bfloat16, generator=g)

    q, k, v = rand(heads).requires_grad_(), rand(kv_heads).requires_grad_(), rand(kv_heads).requires_grad_()
    out = attention._flash_varlen(q, k, v, cu.cuda(), max(lens), dim ** -0.5, window)
    grad_out = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    out.backward(grad_out)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention._reference_varlen(*ref_in, cu, dim ** -0.5, window)
    ref.backward(grad_out.float())

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel(out, ref) < 1e-2
    for got, want in zip((q.grad, k.grad, v.grad), ref_in):
        assert rel(got, want.grad) < 2e-2


def test_sync_free_adamw_matches_paged_adamw_on_gpu(monkeypatch):
    """lorafit_adamw_32bit is bitsandbytes' 32-bit AdamW kernel: bit-identical parameters and moments to the seed's
    paged_adamw_32bit after several steps on CUDA (each group stepped as one flat tensor), with no
    torch.cuda.synchronize in its step; and with a missing gradient and a resume between steps."""
    from test_fastpath import adamw_pair, assert_same_adamw

    res = adamw_pair(monkeypatch, device="cuda")
    assert res["bnb"][2] == 15 and res["ours"][2] == 0  # bitsandbytes: one per tensor + one at the end, per step
    assert res["bnb"][3] == 12 and res["ours"][3] == 6  # update kernels: one per tensor, one per group
    # paged state is CUDA managed memory that torch sees as a CPU tensor: assert_same_adamw compares on the CPU
    assert_same_adamw(res, {sh: 3 for sh in [(400, 300), (64, 48), (64,), (32,)]})
    res = adamw_pair(monkeypatch, device="cuda", n=4, drop=(1, 3), reload_after=2)
    assert_same_adamw(res, {(400, 300): 4, (64, 48): 4, (64,): 4, (32,): 3})


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_layer_matches_peft_on_gpu(monkeypatch, dropout):
    """lora.fused on CUDA in bf16 at a 7B q_proj's size (4096 -> 4096, r=64, 2,048 tokens). Against PEFT's own layer
    from the same weights. CUDA's nn.Dropout is torch.native_dropout, so with the same seed both draw the same mask;
    the check against float32 arithmetic on the dequantized weight below does not rely on that."""
    import bitsandbytes.functional as bnbf
    from test_fused import count_calls, peft_pair

    ref, ours = peft_pair("cuda", torch.bfloat16, 4096, 4096, r=64, dropout=dropout)
    calls = count_calls(monkeypatch)
    x = torch.randn(1, 2048, 4096, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(1, 2048, 4096, device="cuda", dtype=torch.bfloat16)
    res = []
    for net in (ref, ours):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        y = net(xi)
        y.backward(gy)
        res.append([y.detach(), xi.grad, *[p.grad for p in net.parameters() if p.requires_grad]])
    assert len(calls) == 1

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    for got, want in zip(*res):
        assert rel(got, want) < 1e-2  # bf16: PEFT rounds the LoRA term three times, the fused layer once

    # float32 arithmetic from the definition, on ours' weights and the mask of the same seeded call
    layer = ours.base_model.model.proj
    w = bnbf.dequantize_4bit(layer.base_layer.weight, layer.base_layer.weight.quant_state).float()
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    torch.manual_seed(3)
    xf = x.float().requires_grad_(True)
    if dropout:
        _, mask = torch.native_dropout(x.reshape(-1, 4096), dropout, True)
        xd = xf * mask.view(x.shape) / (1 - dropout)
    else:
        xd = xf
    yf = xf @ w.t() + layer.scaling["default"] * (xd @ a.t()) @ b.t()
    yf.backward(gy.float())
    assert rel(res[1][0], yf) < 1e-2 and rel(res[1][1], xf.grad) < 1e-2


def test_packed_step_with_indexed_lm_head_never_syncs_and_matches_trls_head():
    """A packed micro-step of a small Llama on CUDA as the fast recipe runs it (varlen attention, transformers' mask
    skipped, the indexed LM head): forward and backward under torch's sync debug mode "error", so any host-device
    sync fails the test. TRL's fused head on the same batch does sync (boolean masks on the device: the check bites),
    and gives the same loss and gradients (bf16 compute: relative error < 1e-2)."""
    from test_fastpath import packed
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from lorafit import attention, lm_head

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    m = LlamaForCausalLM._from_config(cfg, attn_implementation=attention.register_varlen_attention())
    m = m.to("cuda", torch.bfloat16).train()
    m.get_input_embeddings().weight.requires_grad_(False)  # frozen as in LoRA training (its CUDA backward syncs)
    attention.skip_mask_building(m)
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    assert lm_head.install_indexed_lm_head(m)
    _, batch = packed([40, 7, 100, 1, 60])
    labels = batch["input_ids"].clone()
    labels[0, :30] = -100  # a prompt: not scored
    starts = batch["cu_seq_lens_q"][:-1].long()
    labels[0, starts] = -100  # each row's first token is not a target of the row before it
    batch["labels"] = labels
    idx = lm_head.label_index(batch)  # on the host, as the collator computes it
    cuda = {k: v.cuda() if torch.is_tensor(v) and k not in ("cu_seq_lens_q", "cu_seq_lens_k") else v
            for k, v in batch.items()}
    cuda["cu_seq_lens_q"] = cuda["cu_seq_lens_k"] = batch["cu_seq_lens_q"].cuda()
    idx = idx.cuda()

    def step(**kw):
        m.zero_grad(set_to_none=True)
        out = m(**cuda, **kw)
        loss = out.loss if "lorafit_label_index" in kw else -out.log_probs.sum() / out.label_mask.sum()
        loss.backward()
        return loss.detach().float(), [p.grad.float() for p in m.parameters() if p.grad is not None]

    step(lorafit_label_index=idx)  # warm-up: Triton compiles the head's kernels, cuBLAS picks its algorithms
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours, g_ours = step(lorafit_label_index=idx)
        with pytest.raises(RuntimeError, match="synchroniz"):
            step(fused_lm_head=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref, g_ref = step(fused_lm_head=True)
    assert abs(ours.item() - ref.item()) <= 1e-2 * abs(ref.item())
    assert len(g_ours) == len(g_ref) > 0
    for a, b in zip(g_ours, g_ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_triton_dequantize_is_bitsandbytes_bit_for_bit(dtype):
    """quantization.dequant_kernel=triton (lorafit.fused._triton_dequantize) against bitsandbytes' own CUDA kernel:
    the same values bit for bit, at a 7B's q_proj and mlp sizes and at sizes that end mid-block."""
    import bitsandbytes.functional as F

    from lorafit import fused

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(4096, 4096), (11008, 4096), (96, 200), (7, 66)]:
        w = torch.randn(shape, device="cuda", dtype=dt, generator=g)
        q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.uint8)
        assert fused._triton_covers(q, qs)
        want = F.dequantize_4bit(q, qs)
        got = fused._triton_dequantize(q, qs)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), (shape, (got.float() - want.float()).abs().max().item())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dropout_grad_kernel_is_addcmul_bit_for_bit(dtype):
    """The fused layer's dropout backward (lorafit.fused._dropout_grad_add, a Triton kernel) against torch's
    gx.addcmul_(t, mask, value=1 / (1 - p)), which it replaces: the same bits, at a 7B step's q_proj gradient
    (4,059 tokens x 4,096) and at a size that ends mid-program (the last program's loads and stores masked)."""
    from lorafit import fused

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    fused._dropout_grad_kernel.cache_clear()
    for shape in [(4059, 4096), (7, 333)]:
        gx = torch.randn(shape, device="cuda", dtype=dt, generator=g)
        t = torch.randn(shape, device="cuda", dtype=dt, generator=g)
        mask = torch.rand(shape, device="cuda", generator=g) > 0.1
        want = gx.clone().addcmul_(t, mask, value=1.0 / (1.0 - 0.1))
        got = gx.clone()
        fused._dropout_grad_add(got, t, mask, 1.0 / (1.0 - 0.1))
        assert fused._dropout_grad_kernel.cache_info().currsize == 1  # the kernel ran, not addcmul_'s fallback
        assert torch.equal(got, want), (shape, (got.float() - want.float()).abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability 8.9+")
@pytest.mark.parametrize("nested", [False, True])
def test_fp8_kernels_are_the_torch_reference_bit_for_bit(monkeypatch, nested):
    """lorafit.fp8's Triton kernels (NF4 -> e4m3, row and transposed; row-wise scaling of activations) against its
    torch reference (tests/test_fp8.py checks that one against bitsandbytes and e4m3's definition), bit for bit, at a
    7B's q_proj and mlp sizes and at sizes that end mid-tile; then the FP8 GEMMs on a token count that is not a
    multiple of 16, equal to the product of the quantized operands up to the bf16 output's rounding."""
    import bitsandbytes.functional as F

    from lorafit import fp8

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (528, 320)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        q.quant_state = qs
        x = torch.randn(4093, k, device="cuda", dtype=torch.bfloat16, generator=g)
        gy = torch.randn(4093, n, device="cuda", dtype=torch.bfloat16, generator=g)
        got = [fp8.weight_e4m3(q, False), fp8.weight_e4m3(q, True), fp8.rowwise(x), fp8.rowwise(gy)]
        y, gx = fp8.linear(x, q, torch.bfloat16), fp8.grad_input(gy, q, torch.bfloat16)
        monkeypatch.setattr(fp8, "_has_triton", lambda: False)
        want = [fp8.weight_e4m3(q, False), fp8.weight_e4m3(q, True), fp8.rowwise(x), fp8.rowwise(gy)]
        monkeypatch.undo()
        for (a, sa), (b, sb) in zip(got, want):
            assert a.dtype == b.dtype == torch.float8_e4m3fn and a.shape == b.shape and torch.equal(sa, sb)
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (n, k)
        (wq, sw), (wtq, swt), (xq, sx), (gq, sg) = want
        ref_y = (xq.float() * sx) @ (wq.float() * sw.t()).t()
        ref_gx = (gq.float() * sg) @ (wtq.float() * swt.t()).t()
        for a, b in ((y, ref_y), (gx, ref_gx)):
            assert ((a.float() - b).norm() / b.norm()).item() < 4e-3, (n, k)  # the bf16 output: each element within 2^-8 relative


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability 8.9+")
def test_fused_fp8_layer_stays_near_its_bf16_twin_on_gpu(monkeypatch):
    """A 7B-sized fused LoRA layer (bf16 adapters, dropout 0) with quantization.fp8_matmuls=all against the same layer in
    bf16: output, input gradient and LoRA gradients within 6% relative norm (each FP8 operand is off by at most 1/16
    per element, random in sign; tests/test_fp8.py), and not equal (the FP8 path ran)."""
    from test_fused import output_and_grads, peft_pair

    from lorafit import fused

    ref, ours = peft_pair("cuda", torch.bfloat16, n_in=4096, n_out=4096, r=64)
    fused.install(ref)
    fused.install(ours, fp8_matmuls="all")
    x = torch.randn(2, 2048, 4096, device="cuda", dtype=torch.bfloat16)
    outs = [output_and_grads(net, x) for net in (ref, ours)]
    for a, b in zip(*outs):
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        assert 0 < rel < 0.06, rel


def test_graphed_layers_replay_the_eager_step():
    """lorafit.graphs on a small Llama (varlen attention, q/v trainable as LoRA would be): a step padded to its static
    shape gives the eager step's loss bit for bit (the same kernels, replayed) and its gradients within flash
    attention's own nondeterminism (its backward accumulates dq with atomics), also for a step with other positions
    and boundaries than the captured one; the graphs are taken on every such training step and on nothing else (an
    unpadded batch, a no-grad forward)."""
    from test_fastpath import packed
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit import attention, graphs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    m = LlamaForCausalLM._from_config(cfg, attn_implementation=attention.register_varlen_attention())
    m = m.to("cuda", torch.bfloat16).train()
    for n, p in m.named_parameters():
        p.requires_grad_(n.endswith(("q_proj.weight", "v_proj.weight")))
    attention.skip_mask_building(m)
    _, batch = packed([40, 7, 100, 1, 60])
    _, other = packed([90, 30, 50], seed=2)  # other positions and boundaries: the graphs' shared buffers refresh
    batch["labels"], other["labels"] = batch["input_ids"].clone(), other["input_ids"].clone()
    unpadded = dict(batch)
    shape = graphs.static_shape(2, 128, [3, 2])  # 256 tokens, 3 + 2 real sequences + 2 pad ones at most
    assert graphs.pad_batch(batch, shape, pad_id=0) and graphs.pad_batch(other, shape, pad_id=0)

    def on_gpu(b):
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}

    def step(b):
        m.zero_grad(set_to_none=True)
        loss = m(**on_gpu(b)).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    refs = {"batch": step(batch), "other": step(other)}
    g = graphs.install(m, shape)
    for name, b in (("batch", batch), ("other", other), ("batch", batch)):
        loss, grads = step(b)
        ref, g_ref = refs[name]
        assert torch.equal(loss, ref)
        for x, y in zip(grads, g_ref, strict=True):
            assert ((x.float() - y.float()).norm() / y.float().norm()).item() < 1e-2
    assert g.replays == 3
    step(unpadded)  # 208 tokens: not the static shape, runs eagerly
    with torch.no_grad():
        m(**on_gpu(batch))
    assert g.replays == 3
