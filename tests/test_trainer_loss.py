"""lorafit's lean training loss is TRL's loss, minus the per-step metric syncs."""

import torch
from conftest import tiny_overrides

from lorafit import data, layout, model, recipe, trainer


def test_lean_loss_equals_trl_loss(tmp_path, tiny_llama_dir, guanaco_dir):
    sets = tiny_overrides(tiny_llama_dir, guanaco_dir, tmp_path / "run")
    cfg = recipe.load_recipe("llama2_guanaco", [v for v in sets if v != "--set"] + ["lora.dropout=0.0"])
    lay = layout.decide(cfg, env={}, cuda_available=False)
    args = trainer.build_args(cfg, lay, str(tmp_path / "run"), has_eval=False)
    tok = model.load_tokenizer(cfg, str(tiny_llama_dir))
    prepared = data.prepare(cfg.data, tok)
    net = model.load_model(cfg, lay, str(tiny_llama_dir), tok)
    sft = trainer.build_trainer(cfg, lay, args, net, tok, prepared, [])
    batch = next(iter(sft.get_train_dataloader()))
    batch.pop(trainer.REAL_TOKENS_KEY)
    net.train()
    with torch.no_grad():
        lean = sft.compute_loss(net, dict(batch))
        sft.token_metrics = True  # routes to TRL's own compute_loss
        trl = sft.compute_loss(net, dict(batch))
    # Same fused LM head and the same reduction: identical up to float32 summation order (exact on CPU in practice).
    assert torch.allclose(lean, trl, rtol=1e-6, atol=1e-6), (lean.item(), trl.item())
    assert "entropy" in sft._metrics["train"]  # the TRL path did log its metrics; the lean one did not before it
