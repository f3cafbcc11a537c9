"""src/merge.py: the adapter merged into the 16-bit base gives the logits of base + adapter, in shards under the
size limit with a valid index, and loads with plain AutoModelForCausalLM.from_pretrained."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import REPO

from lorafit.recipe import load_recipe, set_value
from lorafit.run import commit as ck


def _merge_main():
    spec = importlib.util.spec_from_file_location("lorafit_merge_script", REPO / "src" / "merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run folder as train.py leaves it (recipe.yaml, final adapter, tokenizer), with a LoRA update that is far
    from zero: LoRA's B starts at zero, so an untrained adapter would make every merge look right."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("merge") / "run"
    cfg = set_value(load_recipe("llama2_guanaco"), "model.name", str(tiny_llama_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(run)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(run)
    (run / "recipe.yaml").write_text(cfg.to_yaml())
    return run


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_merged_model_equals_base_plus_adapter(tmp_path, run_dir, tiny_llama_dir):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    limit = 100_000  # 100KB: several shards of many small tensors; embeddings and head are one-tensor shards
    assert (
        _merge_main()(["--run", str(run_dir), "--out", str(out), "--max-shard-size", "100KB", "--dtype", "float32"])
        == 0
    )

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as fh:
            names = list(fh.keys())
            sizes = [fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in names]
        assert all(index["weight_map"][k] == shard.name for k in names)
        assert sum(sizes) <= limit or len(names) == 1, (shard.name, sizes)  # one tensor may exceed the limit alone
        total += sum(sizes)
    assert total == index["metadata"]["total_size"]
    assert len(index["weight_map"]) == len(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    )  # every base tensor, no LoRA leftovers

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert getattr(merged.config, "quantization_config", None) is None
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), str(run_dir)
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.randint(3, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    want, got, plain = _logits(reference, ids), _logits(merged, ids), _logits(base, ids)
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the logits: the check below can fail
    # Tolerance: both sides compute in float32 (unit roundoff 6e-8). The merged side rounds W + s*B@A once per weight
    # and sums x@(W + dW) instead of x@W + x@dW; through 2 layers of width 64-128 each logit (|logit| < 1 here)
    # accumulates at most a few hundred such roundings: bounded by ~2e-5 (observed: 4e-7). 5e-5 is above that bound
    # and still 10,000x below the adapter's effect (~0.7) asserted above, so a wrong scale or a missed module fails.
    assert torch.allclose(got, want, atol=5e-5, rtol=0), (got - want).abs().max()


@pytest.mark.slow
def test_default_export_is_bf16_and_a_damaged_checkpoint_is_refused(tmp_path, run_dir, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert _merge_main()(["--run", str(run_dir), "--out", str(out)]) == 0  # defaults: bfloat16, 5GB shards
    assert (out / "model.safetensors").is_file()  # one shard under 5GB: no index needed
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(out, dtype="auto").parameters()} == {torch.bfloat16}
    assert (out / "tokenizer_config.json").is_file()

    assert _merge_main()(["--run", str(run_dir), "--out", str(out)]) == 2  # --out must be new or empty
    assert "exists and is not empty" in capsys.readouterr().err

    # A checkpoint folder is verified against its manifest before anything loads.
    staging = run_dir.parent / "ckrun" / "checkpoints" / ".staging" / "checkpoint-5"
    staging.mkdir(parents=True)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (staging / f).write_bytes((run_dir / f).read_bytes())
    (run_dir.parent / "ckrun" / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())
    folder = ck.commit(staging, 5, keep_last=2, is_main=True)
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "adapter_model.safetensors").write_bytes(data)
    assert _merge_main()(["--run", str(folder.parent.parent), "--out", str(tmp_path / "x")]) == 2
    assert "the sha256 of adapter_model.safetensors does not match" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
