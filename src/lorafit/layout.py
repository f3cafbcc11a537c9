"""The layout policy: every decision that depends on how the run is launched, made once, before the model loads.

Inputs are the environment that `accelerate launch` / torchrun set (WORLD_SIZE, LOCAL_RANK, ACCELERATE_USE_DEEPSPEED,
the ZeRO stage, the mixed precision, offload devices), the recipe, and what the machine has (CUDA, GPU count, bf16),
so the policy is a pure function, unit-tested for every layout on CPU (tests/test_layout.py). Decisions:

| layout  | device_map                  | 4-bit storage dtype | gradient checkpointing |
|---------|-----------------------------|---------------------|------------------------|
| cpu     | {"": "cpu"}                 | uint8               | non-reentrant          |
| single  | {"": local_process_index}   | uint8               | non-reentrant          |
| ddp     | {"": local_process_index}   | uint8               | non-reentrant          |
| zero2   | {"": local_process_index}   | uint8               | non-reentrant          |
| zero3   | none (ZeRO-3 shards it)     | = compute dtype     | reentrant              |
| fsdp2   | none (FSDP2 shards it)      | uint8, sharded as bytes (lorafit.shard) | non-reentrant |

Why:
- The local index, not the global rank: on node 2 of 2, rank 9 owns GPU 1. Never device_map="auto" with several
  processes: each process would spread its own copy of the model over every GPU of the machine.
- ZeRO-3 gets no device_map: bitsandbytes' quantizer then loads onto the current GPU (accelerate set it to the local
  index), and DeepSpeed partitions every parameter, the packed 4-bit ones included, when the engine starts; each GPU
  keeps about 1/N (the training arguments are built before from_pretrained so transformers knows ZeRO-3 is on).
- ZeRO-3 4-bit storage = compute dtype: in bf16/fp16 mode DeepSpeed casts every floating-point parameter to that
  dtype when the engine starts. Packed 4-bit bytes stored as float32 would be converted as numbers and destroyed (seen
  on CPU: "shape '[64, 32]' is invalid for input of size 1024"); stored in the compute dtype they are left alone and
  are sharded like every other parameter, which is the configuration PEFT documents for QLoRA + ZeRO-3. The same cast
  puts LoRA weights and norms in the compute dtype. ZeRO-2 does not partition parameters: uint8 storage is kept.
- FSDP2 (launch/fsdp2.yaml): each 4-bit linear becomes an FSDP2 unit of its own whose packed weight and absmax
  scales are sharded as bytes (lorafit.shard), accelerate wraps each decoder layer and the rest; no device_map (each
  process quantizes its copy onto its GPU, then keeps 1/N). Refused: FSDP1, a non-uint8 4-bit storage (FSDP2's
  copies can corrupt bf16-stored packed bytes, bitsandbytes#1945), accelerate's cpu_ram_efficient_loading (it rebuilds
  parameters from rank 0's state dict), parameter offload, and FSDP's own activation checkpointing (the recipe's
  non-reentrant checkpointing works with FSDP2).
- DDP: non-reentrant checkpointing. Reentrant checkpointing re-runs backward hooks, which DDP rejects as soon as it
  looks for unused parameters ("Expected to mark a variable ready only once", reproduced on CPU);
  find_unused_parameters=False is right anyway because every LoRA weight is used at every step, and it saves a
  graph traversal per step.
- ZeRO-3 + PEFT: reentrant checkpointing. Non-reentrant checkpointing checks the saved tensors' metadata in the
  recompute, where ZeRO-3 has already released frozen parameters to shape [0] ("CheckpointError: Recomputed values
  ... have different metadata", huggingface/transformers#47254, deepspeedai/DeepSpeed#4332; TRL forces reentrant in
  this case for the same reason). Input grads are enabled (lorafit.model), which reentrant checkpointing needs to
  propagate gradients through a frozen base.
- The fused 4-bit layers (lora.fused, lorafit.fused) run on cpu, single, ddp and zero2; ZeRO-3 and FSDP2 keep PEFT's
  and bitsandbytes' layers, whose sharded weights they gather through hooks on each module. Kept 16-bit weights
  (quantization.keep_dequantized) need a run without recompute and offloading.
- The fused layers' NF4 dequantize is bitsandbytes' kernel unless quantization.dequant_kernel=triton asks for
  lorafit's, which runs on a GPU with Triton (a CPU run keeps bitsandbytes', with a note).
- quantization.fp8_matmuls runs inside the fused layers (off where they are) and needs FP8 tensor cores (8.9+).
- The training loss's LM head runs on positions the collator indexes on the host (lorafit.lm_head, no device sync)
  everywhere but ZeRO-3, whose sharded head weight TRL's fused head gathers first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lorafit.errors import UserError
from lorafit.optim import BNB_OPTIMIZERS, optimizer_for_dtensor
from lorafit.recipe import Recipe
from lorafit.shard import check_fsdp_launch

_PRECISION_OF = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


@dataclass
class Layout:
    kind: str  # cpu | single | ddp | zero2 | zero3 | fsdp2
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
    cpu_threads: int | None = None  # set torch's intra-op threads to this (CPU runs of one process)
    sdpa_cudnn: bool = False  # whether sdpa may pick cuDNN's attention kernel (GPU runs with attn sdpa)
    attn_implementation: str = "sdpa"  # the name handed to transformers (model.attn_implementation, resolved)
    fused_4bit: bool = False  # lorafit.fused swaps the 4-bit linears (lora.fused, where the layout allows it)
    keep_dequantized: bool = False  # ... and keeps their 16-bit weights for the backward
    indexed_lm_head: bool = True  # the training loss's LM head on host-indexed positions (lorafit.lm_head)
    dequant_kernel: str = "bitsandbytes"  # the fused layers' NF4 dequantize: bitsandbytes | triton (lorafit.fused)
    fp8_matmuls: str = "off"  # the fused layers' base GEMMs in FP8: off | input_grads | all (lorafit.fp8)
    cuda_graphs: bool = False  # decoder layers replayed as CUDA graphs on fixed-shape steps (lorafit.graphs)
    optimizer: str = ""  # training.optimizer, or its torch twin where the layout cannot run bitsandbytes' (FSDP2)
    notes: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"layout {self.kind}: world size {self.world_size}, device {self.device}, device_map "
            f"{self.device_map}, 4-bit storage {self.quant_storage}, gradient checkpointing "
            f"{'on ' + json.dumps(self.gradient_checkpointing_kwargs) if self.gradient_checkpointing else 'off'}, "
            f"attention {self.attn_implementation}, effective batch {self.effective_batch}" + (f"; {'; '.join(self.notes)}" if self.notes else "")
        )


def _truthy(v: str | None) -> bool:
    return str(v).lower() in {"1", "true", "yes"}


def _deepspeed(env: Mapping[str, str]) -> dict | None:
    """The ZeRO stage and offload devices accelerate launch passes down, or None without DeepSpeed."""
    if not _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        return None
    ds: dict = {}
    cfg_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if cfg_file and os.path.isfile(cfg_file):
        with open(cfg_file) as fh:
            zero = json.load(fh).get("zero_optimization", {})
        ds = {"stage": zero.get("stage", 0), "offload_optimizer": zero.get("offload_optimizer", {}).get("device"),
              "offload_param": zero.get("offload_param", {}).get("device")}
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    ds["stage"] = int(stage) if stage else int(ds.get("stage") or 0)
    for key in ("offload_optimizer", "offload_param"):
        dev = env.get(f"ACCELERATE_DEEPSPEED_{key.upper()}_DEVICE") or ds.get(key) or "none"
        ds[key] = str(dev).lower()
    return ds


@dataclass
class _Launch:
    """What the launcher and the machine say, read once: the world, this process's place in it, the engine."""

    world: int
    rank: int
    local: int
    on_cpu: bool
    ds: dict | None
    stage: int | None
    kind: str  # cpu | single | ddp | zero2 | zero3 | fsdp2
    gpu_count: int


def decide(
    cfg: Recipe,
    env: Mapping[str, str] | None = None,
    cuda_available: bool | None = None,
    bf16_supported: bool | None = None,
    gpu_count: int | None = None,
    shape=None,
    gpu_gib: float | None = None,
    torch_version: str | None = None,
    gpu_capability: tuple[int, int] | None = None,
) -> Layout:
    """Decide the layout from the launch environment and the recipe; refuse what cannot work (UserError). The
    recipe's own cross-field rules were checked when it was loaded (Recipe.validate); these are the launch's."""
    env = os.environ if env is None else env
    if cuda_available is None or gpu_count is None:
        import torch

        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        gpu_count = (torch.cuda.device_count() if cuda_available else 0) if gpu_count is None else gpu_count
    launch = _launch(cfg, env, cuda_available, gpu_count, torch_version)
    _check_precision(cfg, env, launch, bf16_supported)
    notes: list[str] = []
    storage, device_map, gc_kwargs = _placement(cfg, launch, notes)
    if not launch.on_cpu and launch.world == 1 and launch.gpu_count > 1 and not launch.ds:
        # One process with several visible GPUs would make HF Trainer wrap the model in nn.DataParallel, which TRL
        # refuses with a traceback (seen on a 4-GPU H100 box); a 4-bit model cannot be replicated that way anyway.
        raise UserError(
            f"{launch.gpu_count} GPUs are visible to a single process; use them all with accelerate launch "
            "--config_file launch/ddp.yaml (or zero2/zero3), or make one visible with CUDA_VISIBLE_DEVICES=0"
        )
    gc = _checkpointing(cfg, launch, shape, gpu_gib, notes)
    fused, keep, dequant = _fused_layers(cfg, launch, gc, notes)
    use_fp8 = _fp8(cfg, launch, fused, gpu_capability, notes, shape)
    optimizer = _optimizer(cfg, launch, notes)
    t = cfg.training
    return Layout(
        kind=launch.kind,
        world_size=launch.world,
        rank=launch.rank,
        local_rank=launch.local,
        device="cpu" if launch.on_cpu else f"cuda:{launch.local}",
        device_map=device_map,
        quant_storage=storage,
        compute_dtype=cfg.quantization.compute_dtype,
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs=gc_kwargs if gc else {},
        ddp_find_unused_parameters=False if launch.world > 1 else None,
        zero_stage=launch.stage,
        effective_batch=t.per_device_batch_size * t.gradient_accumulation_steps * launch.world,
        cpu_threads=_cpu_threads(env) if launch.on_cpu and launch.world == 1 else None,
        # torch 2.11 sends sdpa with a padding mask to cuDNN first on Hopper, and cuDNN builds an execution plan for
        # each new (batch, length): ~1.1 s forward + backward per new shape, measured on an H100 (docs/benchmarks.md).
        # Without it sdpa takes its memory-efficient or flash kernel, which need no plan.
        sdpa_cudnn=cfg.model.sdpa_cudnn,
        attn_implementation=_attention(cfg, launch),
        fused_4bit=fused,
        keep_dequantized=keep,
        # ZeRO-3 shards the LM head's weight: TRL's fused head gathers it, the indexed head would read the shard
        indexed_lm_head=launch.kind != "zero3",
        dequant_kernel=dequant,
        fp8_matmuls=use_fp8,
        cuda_graphs=_graphs(cfg, launch, gc, notes),
        optimizer=optimizer,
        notes=notes,
    )


def _launch(cfg: Recipe, env: Mapping[str, str], cuda_available: bool, gpu_count: int,
            torch_version: str | None) -> _Launch:
    """Where and how this process runs; refuses launches lorafit has no layout for."""
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", "0"))
    t = cfg.training
    fsdp = _truthy(env.get("ACCELERATE_USE_FSDP"))
    if fsdp:
        check_fsdp_launch(env, torch_version)
    if t.device == "cuda" and not cuda_available:
        raise UserError("training.device=cuda but no CUDA GPU is visible; use training.device=auto or cpu")
    on_cpu = t.device == "cpu" or _truthy(env.get("ACCELERATE_USE_CPU")) or not cuda_available
    if not on_cpu and local >= gpu_count:
        raise UserError(
            f"process {local} of this machine has no GPU of its own ({gpu_count} visible); launch at "
            f"most {gpu_count} processes per machine (--num_processes {gpu_count})"
        )
    ds = _deepspeed(env)
    stage = ds["stage"] if ds else None
    if fsdp and (_truthy(env.get("ACCELERATE_USE_CPU")) or (t.device == "cpu" and cuda_available)):
        raise UserError(
            "an FSDP launch config cannot run on accelerate's CPU path (ACCELERATE_USE_CPU or training.device=cpu), "
            "which drops FSDP; to try FSDP2 on CPU, unset ACCELERATE_USE_CPU on a machine without visible GPUs "
            "(docs/distributed.md)"
        )
    if ds and (_truthy(env.get("ACCELERATE_USE_CPU")) or (t.device == "cpu" and cuda_available)):
        # accelerate drops DeepSpeed on its CPU path and wraps the model in DDP, while transformers has prepared for
        # DeepSpeed: ZeRO-2 silently becomes DDP, ZeRO-3 crashes (both reproduced on CPU).
        raise UserError(
            "a DeepSpeed launch config cannot run on accelerate's CPU path (ACCELERATE_USE_CPU or "
            "training.device=cpu); to try DeepSpeed on CPU, unset ACCELERATE_USE_CPU and set DS_ACCELERATOR=cpu on a "
            "machine without visible GPUs (docs/distributed.md)"
        )
    if stage not in (None, 2, 3):
        raise UserError(
            f"DeepSpeed ZeRO stage {stage} is not a lorafit layout; use launch/zero2.yaml (optimizer "
            "state and gradients sharded) or launch/zero3.yaml (weights sharded too)"
        )
    if ds and ds["offload_param"] != "none" and stage != 3:
        raise UserError(f"parameter offload ({ds['offload_param']}) needs ZeRO-3; use launch/zero3_offload.yaml")
    if ds and ds["offload_optimizer"] != "none" and t.optimizer in BNB_OPTIMIZERS:
        raise UserError(
            f"training.optimizer={t.optimizer} runs bitsandbytes kernels on the GPU, but ZeRO offload "
            "steps the optimizer on the CPU; set --set training.optimizer=adamw_torch, or use "
            "launch/zero3.yaml without offload"
        )
    kind = ("fsdp2" if fsdp else "zero3" if stage == 3 else "zero2" if stage == 2 else "ddp" if world > 1
            else "cpu" if on_cpu else "single")
    return _Launch(world, rank, local, on_cpu, ds, stage, kind, gpu_count)


def _check_precision(cfg: Recipe, env: Mapping[str, str], launch: _Launch, bf16_supported: bool | None) -> None:
    # The trainer runs in the compute dtype's precision on a GPU (bf16=/fp16= of its arguments, which override the
    # launcher's) and in float32 on a CPU, where the launcher's setting would take effect instead (autocast under DDP,
    # DeepSpeed's bf16 mode). A launcher asking for another precision is refused rather than half-applied.
    q = cfg.quantization
    mp = (env.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    trainer_mp = "no" if launch.on_cpu else _PRECISION_OF[q.compute_dtype]
    if mp != "no" and mp != trainer_mp:
        if launch.on_cpu:
            raise UserError(
                f"the launch asks for mixed precision {mp}, but lorafit trains in float32 on a CPU; pass "
                "--mixed_precision no to accelerate launch"
            )
        raise UserError(
            f"the launch asks for mixed precision {mp} but quantization.compute_dtype={q.compute_dtype}; "
            f"pass --mixed_precision {trainer_mp} to accelerate launch, or set --set "
            f"quantization.compute_dtype={_compute_for(mp)}"
        )
    if not launch.on_cpu and q.compute_dtype == "bfloat16" and bf16_supported is False:
        raise UserError(
            "this GPU has no bfloat16 support; set --set quantization.compute_dtype=float16 and launch "
            "with --mixed_precision fp16"
        )


def _placement(cfg: Recipe, launch: _Launch, notes: list[str]) -> tuple[str, dict | None, dict]:
    """(4-bit storage dtype, device_map, checkpointing kwargs): the table in the module docstring."""
    q = cfg.quantization
    if launch.kind == "zero3":
        if q.load_in_4bit and q.quant_storage not in {"auto", q.compute_dtype}:
            raise UserError(
                f"ZeRO-3 needs the packed 4-bit weights stored in the compute dtype ({q.compute_dtype}), "
                f"not {q.quant_storage}; leave quantization.quant_storage=auto, or use launch/zero2.yaml"
            )
        notes.append("ZeRO-3: no device_map; 4-bit weights stored in the compute dtype so they shard with the rest")
        return q.compute_dtype, None, {"use_reentrant": True}
    if launch.kind == "fsdp2":
        if q.load_in_4bit and q.quant_storage not in {"auto", "uint8"}:
            raise UserError(
                f"under FSDP2 lorafit shards the packed 4-bit weights as bytes (uint8); stored as "
                f"{q.quant_storage}, FSDP2's copies can change bit patterns that happen to be NaNs and corrupt them "
                "(bitsandbytes#1945); leave quantization.quant_storage=auto"
            )
        notes.append("FSDP2: no device_map; each 4-bit linear sharded as bytes on its own (lorafit.shard), each "
                     "decoder layer wrapped by accelerate")
        return "uint8", None, {"use_reentrant": False}
    storage = "uint8" if q.quant_storage == "auto" else q.quant_storage
    return storage, {"": "cpu"} if launch.on_cpu else {"": launch.local}, {"use_reentrant": False}


def _attention(cfg: Recipe, launch: _Launch) -> str:
    """The attention implementation's name as transformers gets it (lorafit's for varlen)."""
    attn = cfg.model.attn_implementation
    if attn != "varlen":
        return attn
    from lorafit import attention

    if not launch.on_cpu and not attention.varlen_available():
        import torch

        raise UserError(
            f"model.attn_implementation=varlen needs torch.nn.attention.varlen (PyTorch 2.9 or newer; this is "
            f"{torch.__version__}); use flex_attention or sdpa"
        )
    # On a CPU the same function attends each packed row with sdpa (lorafit.attention): correct, not fast.
    return attention.ATTN_NAME


def _checkpointing(cfg: Recipe, launch: _Launch, shape, gpu_gib: float | None, notes: list[str]) -> bool:
    gc = cfg.training.gradient_checkpointing
    if gc != "auto":
        return bool(gc)
    from lorafit import plan  # the memory planner decides; shape and GPU size are looked up unless given (tests)

    shape = shape or plan.shape_of(cfg.model)
    gpu_gib = gpu_gib if gpu_gib is not None or launch.on_cpu else plan.smallest_gpu_gib()
    gc = plan.choose_checkpointing(cfg, shape, gpu_gib, launch.world, launch.kind in ("zero3", "fsdp2"))
    notes.append(f"gradient checkpointing {'on' if gc else 'off'}: chosen by the memory planner (--plan)")
    return gc


def _fused_layers(cfg: Recipe, launch: _Launch, gc: bool, notes: list[str]) -> tuple[bool, bool, str]:
    """(fused 4-bit layers, their kept 16-bit weights, the dequantize kernel) where this launch allows them."""
    q = cfg.quantization
    fused, keep = cfg.lora.fused and q.load_in_4bit, q.keep_dequantized
    if fused and launch.kind in ("zero3", "fsdp2"):
        # ZeRO-3 and FSDP2 gather each 4-bit shard around the module's forward and backward through hooks on that
        # module; the fused function reads the base weight without calling the module, so it would see a shard.
        # These layouts keep PEFT's layers, which call the 4-bit linear as a module.
        fused = keep = False
        name = "ZeRO-3" if launch.kind == "zero3" else "FSDP2"
        notes.append(f"lora.fused off under {name}: PEFT's and bitsandbytes' own layers run there")
    if keep and gc:
        keep = False
        notes.append("quantization.keep_dequantized off: the memory planner turned gradient checkpointing on")
    dequant = q.dequant_kernel
    if dequant == "triton":
        import importlib.util

        if not fused or launch.on_cpu or importlib.util.find_spec("triton") is None:
            dequant = "bitsandbytes"
            why = "no fused layers here" if not fused else "a CPU run" if launch.on_cpu else "Triton is not installed"
            notes.append(f"quantization.dequant_kernel=bitsandbytes: {why}")
    return fused, keep, dequant


def _fp8(cfg: Recipe, launch: _Launch, fused: bool, capability, notes: list[str], shape) -> str:
    mode, layers = cfg.quantization.fp8_matmuls, cfg.quantization.fp8_skip_forward_layers
    if mode != "off" and not fused:
        notes.append("quantization.fp8_matmuls off: it runs inside the fused layers, which this layout turns off")
    if mode == "off" or not fused:
        return "off"
    from lorafit import fp8

    fp8.check_device(None if launch.on_cpu else launch.local, capability, notes)
    if mode == "all" and layers:  # the indices against the model's depth (its config.json), before any folder
        from lorafit import plan

        fp8.check_layers(layers, (shape or plan.shape_of(cfg.model)).layers)
    return mode


def _graphs(cfg: Recipe, launch: _Launch, gc: bool, notes: list[str]) -> bool:
    """training.cuda_graphs where lorafit.graphs can capture the step, else off (a note saying why under true)."""
    from lorafit import graphs

    if cfg.training.cuda_graphs is False:
        return False
    why = graphs.why_not(cfg, launch.on_cpu, launch.kind, launch.world, gc)
    if why and cfg.training.cuda_graphs is True:
        notes.append(f"training.cuda_graphs off: {why}")
    return not why


def _optimizer(cfg: Recipe, launch: _Launch, notes: list[str]) -> str:
    if launch.kind != "fsdp2":
        return cfg.training.optimizer
    name, note = optimizer_for_dtensor(cfg.training.optimizer, on_cpu=launch.on_cpu)
    if note:
        notes.append(note)
    return name


def _cpu_threads(env: Mapping[str, str]) -> int | None:
    # `accelerate launch` without a CPU config exports OMP_NUM_THREADS=1, which makes a one-process CPU run use one
    # core (the quickstart: ~2.0 s/step instead of ~1.3 on 2 cores). One process owns the machine: use its cores.
    if env.get("OMP_NUM_THREADS", "1") != "1":
        return None  # the user chose a thread count
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _compute_for(mp: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mp, "float32")
