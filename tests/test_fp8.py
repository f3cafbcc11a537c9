"""lorafit.fp8 on CPU (torch's reference path; tests/test_gpu.py checks the Triton kernels against it bit for bit):
the NF4 weight's values, its e4m3 codes and scales, the two FP8 GEMMs, the fused layer's gradients, and the recipe
and layout rules of quantization.fp8_matmuls.

References: bitsandbytes' own dequantize (float32 output: the values before any rounding), and e4m3's definition:
3 mantissa bits, so a normal value rounds to within 2^-4 of itself (relative), and the smallest subnormal step is
2^-9, an absolute error of at most 2^-10 per code near zero.
"""

import bitsandbytes.functional as bnbf
import pytest
import torch
from test_fused import count_calls, output_and_grads, peft_pair
from test_plan import LLAMA2_7B

from lorafit import fp8, fused, layout, recipe
from lorafit.errors import UserError

N, K = 96, 256


def nf4_weight(nested: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[5, 17] = 0.9  # an outlier row: the per-row scales keep it from costing the other rows their precision
    q, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    q.quant_state = qs  # as bitsandbytes' Params4bit carries it
    return q, qs


@pytest.mark.parametrize("nested", [False, True])
def test_nf4_values_are_bitsandbytes_dequantize(nested):
    q, qs = nf4_weight(nested)
    assert torch.equal(fp8.nf4_values(q, qs).view(N, K), bnbf.dequantize_4bit(q, qs))  # float32 out: no rounding


@pytest.mark.parametrize("nested", [False, True])
def test_weight_codes_fill_e4m3_and_scale_back(nested):
    q, qs = nf4_weight(nested)
    vals = fp8.nf4_values(q, qs).view(N, K)
    wq, sw = fp8.weight_e4m3(q, transpose=False)
    wtq, swt = fp8.weight_e4m3(q, transpose=True)
    assert wq.dtype == wtq.dtype == torch.float8_e4m3fn and wq.shape == (N, K) and wtq.shape == (K, N)
    assert sw.shape == (1, N) and swt.shape == (1, K)
    # the element at its block's absmax has the NF4 code +-1, so every row (and every 64-column block of the
    # transposed weight) reaches e4m3's largest value, 448, and none exceeds it
    assert torch.equal(wq.float().abs().amax(1), torch.full((N,), 448.0))
    assert torch.equal(wtq.float().view(K // 64, 64, N).abs().amax((1, 2)), torch.full((K // 64,), 448.0))
    err = (wq.float() * sw.t() - vals).abs()
    assert (err <= vals.abs() / 16 + 2.0 ** -10 * sw.t()).all()
    err = ((wtq.float() * swt.t()).t() - vals).abs()
    assert (err <= vals.abs() / 16 + 2.0 ** -10 * swt).all()
    # the outlier row's scale is its own: another row keeps its small values' precision (its largest value is about
    # 3 sigma = 0.06 against the outlier's 0.9, so its scale is ~15x smaller)
    assert sw[0, 5] > 5 * sw[0, 4]


def test_rowwise_scales_each_token():
    x = torch.randn(7, K, dtype=torch.bfloat16)
    x[3] *= 1000
    x[6] = 0  # an all-zero row: scale 1 and zero codes, no division by zero
    xq, sx = fp8.rowwise(x)
    assert torch.equal(xq.float().abs().amax(1)[:6], torch.full((6,), 448.0)) and xq[6].float().abs().max() == 0
    assert sx[6, 0] == 1.0
    err = (xq.float() * sx - x.float()).abs()
    assert (err <= x.float().abs() / 16 + 2.0 ** -10 * sx).all()


@pytest.mark.parametrize("nested", [False, True])
def test_fp8_gemms_are_the_product_of_the_quantized_operands(nested):
    q, qs = nf4_weight(nested)
    g = torch.Generator().manual_seed(1)
    x, gy = torch.randn(33, K, generator=g), torch.randn(33, N, generator=g)  # 33 tokens: not a multiple of 16
    xq, sx = fp8.rowwise(x)
    wq, sw = fp8.weight_e4m3(q, transpose=False)
    want = (xq.double() * sx.double()) @ (wq.double() * sw.double().t()).t()
    y = fp8.linear(x, q, torch.float32)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-6)  # float32 accumulation of exact products
    gq, sg = fp8.rowwise(gy)
    wtq, swt = fp8.weight_e4m3(q, transpose=True)
    want = (gq.double() * sg.double()) @ (wtq.double() * swt.double().t()).t()
    gx = fp8.grad_input(gy, q, torch.float32)
    assert torch.allclose(gx.double(), want, rtol=1e-5, atol=1e-6)
    # and both are near the NF4 GEMMs: each operand off by <= 1/16 per element, random in sign, so a few percent
    w = fp8.nf4_values(q, qs).view(N, K)
    for got, ref in ((y, x @ w.t()), (gx, gy @ w)):
        assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.06


def test_fused_layer_in_fp8_stays_near_its_16_bit_twin(monkeypatch):
    ref, ours = peft_pair("cpu", torch.float32)
    fused.install(ours, fp8_matmuls="all")
    used = []
    real = fp8.linear
    monkeypatch.setattr(fp8, "linear", lambda *a, **k: (used.append(1), real(*a, **k))[1])
    calls = count_calls(monkeypatch)
    x = torch.randn(3, 16, 256, generator=torch.Generator().manual_seed(2))
    outs = [output_and_grads(net, x) for net in (ref, ours)]
    assert len(calls) == 1 and used == [1]
    for a, b in zip(*outs):  # output, input gradient, lora_A and lora_B gradients
        rel = ((a - b).norm() / a.norm()).item()
        assert 0 < rel < 0.06, rel  # FP8 operands (see above); exactly 0 would mean the FP8 path never ran


def test_sibling_projections_share_one_quantized_input(tiny_llama_dir, monkeypatch):
    """A decoder layer hands one tensor to q_proj, k_proj and v_proj and one to gate_proj and up_proj: with
    fp8_matmuls=all each tensor is quantized once, 4 row-wise quantizations per layer in the forward instead of 7
    (q, o, gate, down), plus the backward's 7 per layer (one per input gradient; none for the first layer's q, k, v,
    whose input comes from the frozen embeddings), with the same loss and gradients, bit for bit, as quantizing at
    every call."""
    from test_fused import batch, load, loss_and_grads

    net = load(tiny_llama_dir, "lora.fused=true", "quantization.fp8_matmuls=all", "quantization.fp8_skip_forward=[]",
               "quantization.fp8_skip_forward_layers=[]")
    layers = net.get_base_model().config.num_hidden_layers
    calls = []
    real = fp8.rowwise
    monkeypatch.setattr(fp8, "rowwise", lambda t: (calls.append(1), real(t))[1])
    shared = loss_and_grads(net, batch())
    assert len(calls) == layers * (4 + 7) - 3
    assert not fp8._LAST_INPUT  # the backward let go of the forward's last input
    calls.clear()
    monkeypatch.setattr(fp8, "_shared_rowwise", lambda t, source: fp8.rowwise(t))
    each = loss_and_grads(net, batch())
    assert len(calls) == layers * (7 + 7) - 3
    assert shared[0] == each[0] and shared[1].keys() == each[1].keys()
    assert all(torch.equal(shared[1][k], each[1][k]) for k in shared[1])


def test_skipped_forwards_stay_in_16_bits(tiny_llama_dir, monkeypatch):
    """fp8_matmuls=all keeps the forward GEMM in the compute dtype (input gradient still FP8: mode input_grads) for the
    linears fp8_skip_forward names and for every linear of the layers fp8_skip_forward_layers lists (negative from
    the end); the rest run both GEMMs in FP8. The LoRA-wrapped q_proj and v_proj count by their PEFT names, whose
    inner base_layer is installed too. The tiny model has 2 layers, so the default [0, 1, -2, -1] keeps all."""
    from test_fused import batch, load

    def modes(net):
        return {name: m.fp8_matmuls for name, m in net.named_modules() if hasattr(m, "fp8_matmuls")}

    base = ["lora.fused=true", "quantization.fp8_matmuls=all"]
    net = load(tiny_llama_dir, *base, "quantization.fp8_skip_forward=down_proj",
               "quantization.fp8_skip_forward_layers=[-1]")
    got = modes(net)
    assert len(got) == 2 * (7 + 2)  # 7 linears a layer, q_proj and v_proj also as their base_layer
    for name, mode in got.items():
        kept = ".layers.1." in name or name.removesuffix(".base_layer").endswith("down_proj")
        assert mode == ("input_grads" if kept else "all"), name
    forwards = []
    real = fp8.linear
    monkeypatch.setattr(fp8, "linear", lambda *a, **k: (forwards.append(1), real(*a, **k))[1])
    net(**batch()).loss.backward()
    assert len(forwards) == 6  # layer 0's q, k, v, o, gate, up
    assert set(modes(load(tiny_llama_dir, *base)).values()) == {"input_grads"}  # the default keeps both layers
    with pytest.raises(UserError, match=r"layer 2 does not exist, the model has 2 decoder layers \(0\.\.1, or -1\.\.-2"):
        load(tiny_llama_dir, *base, "quantization.fp8_skip_forward_layers=[0,2]")
    with pytest.raises(UserError, match="'dwn_proj' is not a decoder linear; name some of q_proj, k_proj"):
        recipe.load_recipe("llama2_guanaco", [*base, "quantization.fp8_skip_forward=dwn_proj"])


def test_input_grads_mode_leaves_the_forward_in_16_bits():
    ref, ours = peft_pair("cpu", torch.float32)
    fused.install(ours, fp8_matmuls="input_grads")
    x = torch.randn(3, 16, 256, generator=torch.Generator().manual_seed(2))
    outs = [output_and_grads(net, x) for net in (ref, ours)]
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)  # the forward: PEFT's, as before
    # the LoRA gradients use the output gradient and saved activations only: unchanged too
    for a, b in zip(outs[0][2:], outs[1][2:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    rel = ((outs[0][1] - outs[1][1]).norm() / outs[0][1].norm()).item()
    assert 0 < rel < 0.06, rel  # the input gradient went through the FP8 GEMM


def test_recipe_and_layout_rules(monkeypatch):
    base = ["lora.fused=true", "quantization.fp8_matmuls=all"]
    with pytest.raises(UserError, match="lora.fused=true"):
        recipe.load_recipe("llama2_guanaco", ["quantization.fp8_matmuls=input_grads"])
    with pytest.raises(UserError, match="keep_dequantized"):
        recipe.load_recipe("llama2_guanaco", base + ["quantization.keep_dequantized=true",
                                                     "training.gradient_checkpointing=false"])
    with pytest.raises(UserError, match="fp8_matmuls"):
        recipe.load_recipe("llama2_guanaco", ["lora.fused=true", "quantization.fp8_matmuls=true"])  # a mode, not a bool
    cfg = recipe.load_recipe("llama2_guanaco", base)
    gpu = dict(env={}, cuda_available=True, bf16_supported=True, gpu_count=1, gpu_gib=80.0, shape=LLAMA2_7B)
    assert layout.decide(cfg, gpu_capability=(9, 0), **gpu).fp8_matmuls == "all"
    with pytest.raises(UserError, match=r"compute capability 8\.9\+.*this GPU is 8\.0"):
        layout.decide(cfg, gpu_capability=(8, 0), **gpu)
    # the layers kept in 16 bits are checked against the model's depth (config.json) before any folder is made
    deep = recipe.load_recipe("llama2_guanaco", [*base, "quantization.fp8_skip_forward_layers=[0,-32,31]"])
    assert layout.decide(deep, gpu_capability=(9, 0), **gpu).fp8_matmuls == "all"
    for bad in ("32", "-33"):
        over = recipe.load_recipe("llama2_guanaco", [*base, f"quantization.fp8_skip_forward_layers=[0,{bad}]"])
        with pytest.raises(UserError, match=f"layer {bad} does not exist, the model has 32 decoder layers"):
            layout.decide(over, gpu_capability=(9, 0), **gpu)
    cpu = layout.decide(cfg, env={}, cuda_available=False, shape=LLAMA2_7B)
    assert cpu.fp8_matmuls == "all" and any("reference path" in n for n in cpu.notes)
    zero3 = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "ACCELERATE_USE_DEEPSPEED": "true",
             "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_MIXED_PRECISION": "bf16"}
    off = layout.decide(cfg, **{**gpu, "env": zero3, "gpu_count": 8})
    assert off.kind == "zero3" and off.fp8_matmuls == "off" and any("fp8_matmuls off" in n for n in off.notes)


@pytest.mark.slow
def test_cli_trains_with_fp8_matmuls(tmp_path, tiny_llama_dir, guanaco_dir):
    """The recipe switch end to end on CPU: the log names the mode, the run finishes with finite losses and an
    adapter. input_grads leaves every step's loss as it was until the first update (step 1's loss is exact, the
    later ones move by the gradients' FP8 rounding); all moves them from step 1, by little: FP8 operands are off by
    <= 1/16 per element, so the loss of a tiny random model moves by well under 5%."""
    from conftest import read_scalars, run_cli, set_args, tiny_overrides

    losses, says = {}, {"off": None, "input_grads": "base input gradients in FP8", "all": "base matmuls in FP8"}
    for mode in says:
        out = tmp_path / f"fp8-{mode}"
        args = ["--recipe", "llama2_guanaco", *tiny_overrides(tiny_llama_dir, guanaco_dir, out, steps=3),
                *set_args(["lora.fused=true", f"quantization.fp8_matmuls={mode}",
                           "training.gradient_checkpointing=false",
                           "quantization.fp8_skip_forward_layers=[]"])]  # the 2-layer model's forwards in FP8
        r = run_cli(args)
        assert r.returncode == 0, r.stderr[-2000:]
        log = (out / "log.txt").read_text()
        assert all((s in log) == (s == says[mode]) for s in says.values() if s)
        assert any(out.glob("**/adapter_model.safetensors"))
        losses[mode] = [v for _, v in read_scalars(out / "tb")["train/loss"]]
    assert len(losses["all"]) == len(losses["off"]) == len(losses["input_grads"]) == 3
    assert losses["input_grads"][0] == losses["off"][0]
    for a, b in zip(losses["off"], losses["all"]):
        assert a != b and abs(a - b) / a < 0.05, (a, b)
