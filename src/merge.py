"""Merge a run's LoRA adapter into its base model, reloaded in 16-bit (not 4-bit), and export a plain checkpoint.

    python src/merge.py --run runs/llama2_guanaco                      # -> runs/llama2_guanaco/merged (bf16, 5GB shards)
    python src/merge.py --run runs/quickstart --out models/reverse --max-shard-size 2GB --dtype float16
    python src/merge.py --run runs/try1/checkpoints/checkpoint-100      # a checkpoint's adapter, verified first
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('runs/quickstart/merged')"

--run takes a run folder (its final adapter, else its newest verified checkpoint) or one checkpoint folder. The base
comes from the run's recipe.yaml. The result is sharded safetensors (model.safetensors.index.json when there is more
than one shard), config, generation config and tokenizer; it loads with plain AutoModelForCausalLM.from_pretrained.

Why 16-bit: the adapter was trained on top of 4-bit NF4 weights, but merging into 4-bit storage would need a
re-quantization that rounds the LoRA update away; the standard export adds it to the 16-bit weights. The merged
model therefore differs from the 4-bit training model by the NF4 quantization error of the base, not by the merge.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from lorafit import cli, hub, recipe
from lorafit.console import log
from lorafit.errors import UserError
from lorafit.run import lookup

_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


def find_adapter(path: Path) -> tuple[Path, Path]:
    """(adapter folder, run folder) for --run; a checkpoint is verified against its manifest first."""
    if not path.is_dir():
        raise UserError(f"--run {path}: no such folder; give a run folder (output.dir) or a checkpoint folder")
    adapter = lookup.find_adapter(path)
    recipe_path = lookup.find_recipe(path)
    if adapter is None:
        raise UserError(f"--run {path} holds no adapter_model.safetensors and no committed checkpoint")
    return adapter, recipe_path.parent if recipe_path else path


def merge(run: Path, out: Path | None, max_shard_size: str, dtype_name: str) -> Path:
    if not _SIZE.match(max_shard_size.strip()):
        raise UserError(f"--max-shard-size {max_shard_size!r}: give a size such as 5GB, 500MB or 2GiB")
    adapter, run_dir = find_adapter(run)
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{run_dir} has no recipe.yaml, so its base model is unknown; is it a lorafit run folder?")
    cfg = recipe.load_recipe(str(run_dir / "recipe.yaml"))
    hub.decide_offline(cfg)  # before transformers is imported
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit import console
    from lorafit.source import materialize

    console.adopt_library_loggers()
    out = Path(out) if out else run_dir / "merged"
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; pick another folder or delete it")
    source = materialize(cfg.model)  # a GGUF base is converted once to a cached 16-bit checkpoint
    dtype = getattr(torch, dtype_name)
    log.info("loading the base %s in %s (not 4-bit) and the adapter from %s", source, dtype_name, adapter)
    base = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload(safe_merge=True)  # safe: refuses NaNs
    merged = merged.to(dtype)  # the adapter may be kept in float32 by PEFT; the merged weights are all `dtype`
    tok = lookup.run_tokenizer(cfg, adapter, run_dir, source)
    merged.config.pad_token_id = tok.pad_token_id
    merged.config.use_cache = True  # training turned the KV cache off; generation wants it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would follow the folder to --out
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size.replace(" ", ""))
        tok.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)  # atomic: a half-written export is never found under --out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    log.info("merged model in %s: %d safetensors shard(s), %s", out, len(shards), dtype_name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (output.dir) or one checkpoint folder")
    p.add_argument("--out", default=None, help="output folder (default: RUN/merged); must be new or empty")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the base and of the merged weights (default bfloat16)",
    )
    args = p.parse_args(argv)
    return cli.guarded(lambda: merge(Path(args.run), Path(args.out) if args.out else None, args.max_shard_size,
                                     args.dtype) and 0)


if __name__ == "__main__":
    sys.exit(main())
