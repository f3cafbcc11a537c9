"""The real CLI trains the tiny Llama through the llama2_guanaco recipe and writes adapter, summary and TensorBoard."""

from conftest import read_scalars, read_summary, run_cli, tiny_overrides


def test_tiny_llama_trains_through_llama2_guanaco(tmp_path, tiny_llama_dir, guanaco_dir):
    out = tmp_path / "run"
    r = run_cli(["--recipe", "llama2_guanaco", *tiny_overrides(tiny_llama_dir, guanaco_dir, out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "adapter_model.safetensors").exists()
    assert read_summary(out)["steps"] == 3
    tags = read_scalars(out / "tb")
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/epoch"):
        assert tag in tags, sorted(tags)
