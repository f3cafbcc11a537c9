"""The layout policy: every decision that depends on how the run is launched, made once, before the model loads.

Inputs are the environment that `accelerate launch` / torchrun set (WORLD_SIZE, LOCAL_RANK, ACCELERATE_USE_DEEPSPEED,
the ZeRO stage, ...), the recipe and whether CUDA is there, so the policy is a pure function, unit-tested for every
layout on CPU. Decisions:

| layout  | device_map                 | 4-bit storage dtype | gradient checkpointing |
|---------|----------------------------|---------------------|------------------------|
| cpu     | {"": "cpu"}                | uint8               | non-reentrant          |
| single  | {"": local_process_index}  | uint8               | non-reentrant          |
| ddp     | {"": local_process_index}  | uint8               | non-reentrant          |
| zero2   | {"": local_process_index}  | uint8               | non-reentrant          |
| zero3   | none (ZeRO-3 places shards)| = compute dtype     | reentrant              |

- The local index, not the global rank: on node 2 of 2, rank 9 owns GPU 1. Never device_map="auto" with several
  processes: it would spread one copy of the model over every GPU from every process.
- ZeRO-3 partitions parameters by flattening them per dtype; packed 4-bit weights must then be stored in the same
  dtype as the LoRA/float parameters (bnb_4bit_quant_storage) or sharding mixes dtypes and fails.
- DDP with reentrant checkpointing marks shared LoRA parameters ready twice; non-reentrant avoids it, and
  find_unused_parameters=False is correct because every LoRA parameter is used each step.
- ZeRO-3 with non-reentrant checkpointing re-gathers parameters whose saved metadata no longer matches in the
  recompute; reentrant checkpointing (with input grads enabled) is what PEFT + DeepSpeed ZeRO-3 needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lorafit.errors import UserError
from lorafit.recipe import Recipe


@dataclass
class Layout:
    kind: str  # cpu | single | ddp | zero2 | zero3
    world_size: int
    rank: int
    local_rank: int
    device: str  # "cpu" or "cuda:N"
    device_map: dict[str, Any] | None
    quant_storage: str
    compute_dtype: str
    gradient_checkpointing: bool
    gradient_checkpointing_kwargs: dict[str, Any] = field(default_factory=dict)
    ddp_find_unused_parameters: bool | None = None
    zero_stage: int | None = None
    effective_batch: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"layout {self.kind}: world size {self.world_size}, device {self.device}, device_map "
                f"{self.device_map}, 4-bit storage {self.quant_storage}, gradient checkpointing "
                f"{'on ' + json.dumps(self.gradient_checkpointing_kwargs) if self.gradient_checkpointing else 'off'}, "
                f"effective batch {self.effective_batch}")


def _truthy(v: str | None) -> bool:
    return str(v).lower() in {"1", "true", "yes"}


def _zero_stage(env: Mapping[str, str]) -> int | None:
    if not _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        return None
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    cfg_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if cfg_file and os.path.isfile(cfg_file):
        with open(cfg_file) as fh:
            return int(json.load(fh).get("zero_optimization", {}).get("stage", 0))
    return 0


def decide(cfg: Recipe, env: Mapping[str, str] | None = None, cuda_available: bool | None = None,
           bf16_supported: bool | None = None) -> Layout:
    """Decide the layout from the launch environment and the recipe; refuse what cannot work (UserError)."""
    env = os.environ if env is None else env
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", "0"))
    stage = _zero_stage(env)
    want_cpu = cfg.training.device == "cpu" or _truthy(env.get("ACCELERATE_USE_CPU"))
    if cfg.training.device == "cuda" and not cuda_available:
        raise UserError("training.device=cuda but no CUDA GPU is visible; use training.device=auto or cpu")
    on_cpu = want_cpu or not cuda_available
    q = cfg.quantization
    notes: list[str] = []

    if stage is not None and stage not in (0, 2, 3):
        raise UserError(f"DeepSpeed ZeRO stage {stage} is not supported; use launch/zero2.yaml or launch/zero3.yaml")
    if stage == 0:
        stage = None
    kind = "zero3" if stage == 3 else "zero2" if stage == 2 else "ddp" if world > 1 else "cpu" if on_cpu else "single"

    mp = (env.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    if mp in {"bf16", "fp16"} and {"bf16": "bfloat16", "fp16": "float16"}[mp] != q.compute_dtype:
        want = "bfloat16" if mp == "bf16" else "float16"
        raise UserError(f"the launch config uses mixed precision {mp} but quantization.compute_dtype="
                        f"{q.compute_dtype}; set --set quantization.compute_dtype={want} or pick a launch config "
                        "with the matching precision")
    if not on_cpu and q.compute_dtype == "bfloat16" and bf16_supported is False:
        raise UserError("this GPU has no bfloat16 support; set --set quantization.compute_dtype=float16")

    if kind == "zero3":
        storage = q.compute_dtype
        if q.load_in_4bit and q.quant_storage not in {"auto", q.compute_dtype}:
            raise UserError(f"ZeRO-3 cannot shard 4-bit weights stored as {q.quant_storage} next to "
                            f"{q.compute_dtype} LoRA weights; leave quantization.quant_storage=auto (or set it to "
                            f"{q.compute_dtype}), or use launch/zero2.yaml or launch/ddp.yaml")
        device_map = None
        gc_kwargs = {"use_reentrant": True}
        notes.append("ZeRO-3: no device_map; 4-bit weights stored in the compute dtype so they shard with LoRA")
    else:
        storage = "uint8" if q.quant_storage == "auto" else q.quant_storage
        device_map = {"": "cpu"} if on_cpu else {"": local}
        gc_kwargs = {"use_reentrant": False}
    if on_cpu and kind != "zero3":
        device = "cpu"
    else:
        device = "cpu" if on_cpu else f"cuda:{local}"

    lay = Layout(
        kind=kind,
        world_size=world,
        rank=rank,
        local_rank=local,
        device=device,
        device_map=device_map,
        quant_storage=storage,
        compute_dtype=q.compute_dtype,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
        gradient_checkpointing_kwargs=gc_kwargs if cfg.training.gradient_checkpointing else {},
        ddp_find_unused_parameters=False if world > 1 else None,
        zero_stage=stage,
        effective_batch=cfg.training.per_device_batch_size * cfg.training.gradient_accumulation_steps * world,
        notes=notes,
    )
    return lay
