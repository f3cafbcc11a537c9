"""The layout policy (lorafit.layout.decide) for every layout and every refused combination, and the shipped launch
configs, turned into the environment accelerate launch gives the training processes, lead to the intended layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from lorafit import layout
from lorafit.errors import UserError
from lorafit.recipe import load_recipe

LAUNCH = REPO / "launch"
DS = {"ACCELERATE_USE_DEEPSPEED": "true"}


def guanaco(*overrides: str):
    """The seed recipe: bf16 compute, per-device batch 4, accumulation 1, gradient checkpointing, paged AdamW."""
    return load_recipe("llama2_guanaco", list(overrides))


def gpu(cfg, env, gpus: int | None = None, **kw) -> layout.Layout:
    # one process sees one GPU (several would be refused: test_refusal_message); a distributed job sees 8 per machine
    gpus = gpus if gpus is not None else (8 if int(env.get("WORLD_SIZE", "1")) > 1 else 1)
    return layout.decide(cfg, env=env, cuda_available=True, bf16_supported=True, gpu_count=gpus, **kw)


def dist_env(world: int, rank: int, local: int, **extra) -> dict:
    return {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(local), **extra}


# ----------------------------------------------------------------------------------------------------------------
# Decisions


def test_cpu_without_launcher():
    lay = layout.decide(guanaco(), env={}, cuda_available=False)
    assert (lay.kind, lay.device, lay.device_map, lay.quant_storage) == ("cpu", "cpu", {"": "cpu"}, "uint8")
    assert lay.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert lay.ddp_find_unused_parameters is None and lay.world_size == 1
    assert lay.effective_batch == 4  # 4 per device x 1 accumulation x 1 process


def test_single_gpu_loads_on_the_local_gpu():
    lay = gpu(guanaco(), {})
    assert (lay.kind, lay.device, lay.device_map, lay.quant_storage) == ("single", "cuda:0", {"": 0}, "uint8")
    assert lay.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_sdpa_keeps_cudnn_attention_off_unless_the_recipe_asks():
    """cuDNN's sdpa kernel builds a plan per new padded shape (~1.1 s each on an H100 with torch 2.11;
    docs/benchmarks.md), so the layout leaves it off by default and model.load_model applies that on GPU runs."""
    assert gpu(guanaco(), {}).sdpa_cudnn is False
    assert gpu(guanaco("model.sdpa_cudnn=true"), {}).sdpa_cudnn is True


def test_ddp_uses_the_local_index_not_the_global_rank():
    # node 2 of 2 with 8 GPUs each: global rank 9 is the second process of its machine, so it owns GPU 1
    lay = gpu(guanaco("training.gradient_accumulation_steps=2"), dist_env(16, 9, 1, ACCELERATE_MIXED_PRECISION="bf16"))
    assert (lay.kind, lay.rank, lay.local_rank, lay.device, lay.device_map) == ("ddp", 9, 1, "cuda:1", {"": 1})
    assert lay.ddp_find_unused_parameters is False
    assert lay.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert lay.effective_batch == 4 * 2 * 16  # per device x accumulation x world size
    assert not lay.is_main


def test_zero2_keeps_a_whole_4bit_model_per_gpu():
    env = dist_env(2, 1, 1, **DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="2", ACCELERATE_MIXED_PRECISION="bf16")
    lay = gpu(guanaco(), env)
    assert (lay.kind, lay.zero_stage, lay.device_map, lay.quant_storage) == ("zero2", 2, {"": 1}, "uint8")
    assert lay.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert lay.effective_batch == 8


def test_zero3_shards_4bit_weights_stored_in_the_compute_dtype():
    env = dist_env(4, 0, 0, **DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_MIXED_PRECISION="bf16")
    lay = gpu(guanaco(), env)
    assert (lay.kind, lay.zero_stage, lay.device_map, lay.device) == ("zero3", 3, None, "cuda:0")
    assert lay.quant_storage == lay.compute_dtype == "bfloat16"
    assert lay.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert lay.ddp_find_unused_parameters is False and lay.effective_batch == 16


def test_zero3_fp16_stores_4bit_weights_as_fp16():
    env = dist_env(2, 0, 0, **DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_MIXED_PRECISION="fp16")
    assert gpu(guanaco("quantization.compute_dtype=float16"), env).quant_storage == "float16"


def test_zero_stage_from_a_deepspeed_config_file(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}}))
    env = dist_env(2, 0, 0, **DS, ACCELERATE_DEEPSPEED_CONFIG_FILE=str(f))
    assert gpu(guanaco(), env).kind == "zero3"


def test_deepspeed_on_cpu_is_a_zero_layout_on_the_cpu():
    env = dist_env(2, 1, 1, **DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_MIXED_PRECISION="no")
    lay = layout.decide(guanaco("quantization.compute_dtype=float32"), env=env, cuda_available=False)
    assert (lay.kind, lay.device, lay.device_map, lay.quant_storage) == ("zero3", "cpu", None, "float32")


def test_accelerate_use_cpu_wins_over_visible_gpus():
    lay = gpu(guanaco("quantization.compute_dtype=float32"), dist_env(2, 1, 1, ACCELERATE_USE_CPU="1"))
    assert (lay.kind, lay.device, lay.device_map) == ("ddp", "cpu", {"": "cpu"})


def test_launcher_without_mixed_precision_keeps_the_compute_dtype():
    # `accelerate launch` with no config passes "no"; the trainer's own bf16 (from the compute dtype) applies
    assert gpu(guanaco(), {"ACCELERATE_MIXED_PRECISION": "no"}).kind == "single"


def test_checkpointing_off_has_no_mode():
    lay = gpu(guanaco("training.gradient_checkpointing=false"), dist_env(2, 0, 0))
    assert lay.gradient_checkpointing is False and lay.gradient_checkpointing_kwargs == {}


def test_layout_decides_fused_and_kept_weights(monkeypatch):
    fast = load_recipe("llama2_guanaco_fast")
    assert fast.lora.fused
    single = gpu(fast, {})
    assert single.fused_4bit and not single.keep_dequantized
    zero3 = gpu(fast, dist_env(2, 0, 0, **DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_MIXED_PRECISION="bf16"),
                gpus=2)
    assert not zero3.fused_4bit and any("ZeRO-3" in n and "fused" in n for n in zero3.notes)
    # the indexed LM head would read ZeRO-3's shard of the head weight; every other layout uses it
    assert single.indexed_lm_head and not zero3.indexed_lm_head
    zero2 = gpu(fast, dist_env(2, 0, 0, **DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="2", ACCELERATE_MIXED_PRECISION="bf16"),
                gpus=2)
    assert zero2.indexed_lm_head and gpu(fast, dist_env(2, 0, 0), gpus=2).indexed_lm_head
    tri = load_recipe("llama2_guanaco_fast", ["quantization.dequant_kernel=triton"])
    assert single.dequant_kernel == "bitsandbytes"  # the default
    cpu = layout.decide(tri, env={}, cuda_available=False)
    assert cpu.dequant_kernel == "bitsandbytes" and any("dequant_kernel=bitsandbytes: a CPU run" in n for n in cpu.notes)
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "triton" else real_find(n, *a))
    assert gpu(tri, {}).dequant_kernel == "triton"  # a GPU with Triton: lorafit's kernel
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real_find(n, *a))
    no_triton = gpu(tri, {})
    monkeypatch.undo()
    assert no_triton.dequant_kernel == "bitsandbytes" and any("Triton is not installed" in n for n in no_triton.notes)
    # the recipe's own cross-field rules are refused when it is loaded (Recipe.validate), before any layout
    for extra, msg in ((["lora.fused=false"], "set lora.fused=true"), (["quantization.double_quant=true"], "plain NF4")):
        with pytest.raises(UserError, match=msg):
            load_recipe("llama2_guanaco_fast", ["quantization.dequant_kernel=triton", *extra])
    keep = load_recipe("llama2_guanaco_fast", ["quantization.keep_dequantized=true"])
    assert gpu(keep, {}).keep_dequantized
    with pytest.raises(UserError, match="needs lora.fused=true"):
        load_recipe("llama2_guanaco_fast", ["quantization.keep_dequantized=true", "lora.fused=false"])
    with pytest.raises(UserError, match="gradient checkpointing"):
        load_recipe("llama2_guanaco_lean", ["quantization.keep_dequantized=true"])
    # set in either order on the command line, a valid combination is accepted
    assert load_recipe("llama2_guanaco", ["quantization.keep_dequantized=true", "lora.fused=true",
                                          "training.gradient_checkpointing=false"]).lora.fused


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("stage", [None, "2", "3"])
def test_never_device_map_auto(world, stage):
    env = dist_env(world, world - 1, world - 1, ACCELERATE_MIXED_PRECISION="bf16")
    if stage:
        env.update(DS, ACCELERATE_DEEPSPEED_ZERO_STAGE=stage)
    lay = gpu(guanaco(), env)
    assert lay.device_map in ({"": world - 1}, None)


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one line, naming what to use instead


REFUSALS = {
    "fsdp": (
        dict(ACCELERATE_USE_FSDP="true"),
        (),
        "FSDP version 1 is not a lorafit layout (its flat parameters need one dtype for the packed 4-bit weights "
        "and the rest); use launch/fsdp2.yaml (FSDP2), or launch/zero3.yaml",
    ),
    "zero1": (
        dict(**DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="1"),
        (),
        "DeepSpeed ZeRO stage 1 is not a lorafit layout; use launch/zero2.yaml",
    ),
    "param offload on zero2": (
        dict(**DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="2", ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu"),
        (),
        "parameter offload (cpu) needs ZeRO-3; use launch/zero3_offload.yaml",
    ),
    "offload with paged adamw": (
        dict(**DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu"),
        (),
        "training.optimizer=paged_adamw_32bit runs bitsandbytes kernels on the GPU, but ZeRO "
        "offload steps the optimizer on the CPU; set --set training.optimizer=adamw_torch",
    ),
    "fp16 launch, bf16 compute": (
        dict(ACCELERATE_MIXED_PRECISION="fp16"),
        (),
        "the launch asks for mixed precision fp16 but quantization.compute_dtype=bfloat16; "
        "pass --mixed_precision bf16 to accelerate launch, or set --set "
        "quantization.compute_dtype=float16",
    ),
    "bf16 launch, float32 compute": (
        dict(ACCELERATE_MIXED_PRECISION="bf16"),
        ("quantization.compute_dtype=float32",),
        "pass --mixed_precision no to accelerate launch, or set --set quantization.compute_dtype=bfloat16",
    ),
    "zero3 with uint8 storage": (
        dict(**DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_MIXED_PRECISION="bf16"),
        ("quantization.quant_storage=uint8",),
        "ZeRO-3 needs the packed 4-bit weights stored in the compute dtype (bfloat16), not "
        "uint8; leave quantization.quant_storage=auto, or use launch/zero2.yaml",
    ),
    "deepspeed on accelerate's cpu path": (
        dict(**DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="2", ACCELERATE_USE_CPU="1"),
        (),
        "a DeepSpeed launch config cannot run on accelerate's CPU path (ACCELERATE_USE_CPU or training.device=cpu); "
        "to try DeepSpeed on CPU, unset ACCELERATE_USE_CPU and set DS_ACCELERATOR=cpu",
    ),
    "deepspeed with training.device=cpu next to gpus": (
        dict(**DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="3"),
        ("training.device=cpu",),
        "a DeepSpeed launch config cannot run on accelerate's CPU path",
    ),
    "one process, several GPUs (HF would use nn.DataParallel)": (
        {},
        (),
        "2 GPUs are visible to a single process; use them all with accelerate launch --config_file "
        "launch/ddp.yaml (or zero2/zero3), or make one visible with CUDA_VISIBLE_DEVICES=0",
    ),
    "more processes than GPUs": (
        dict(LOCAL_RANK="2", WORLD_SIZE="3"),
        (),
        "process 2 of this machine has no GPU of its own (2 visible); launch at most 2 "
        "processes per machine (--num_processes 2)",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusal_message(name):
    env, overrides, message = REFUSALS[name]
    with pytest.raises(UserError) as e:
        gpu(guanaco(*overrides), env, gpus=2)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_refuses_bf16_on_a_gpu_without_it():
    with pytest.raises(UserError, match=r"no bfloat16 support; set --set quantization.compute_dtype=float16"):
        layout.decide(guanaco(), env={}, cuda_available=True, bf16_supported=False, gpu_count=1)


def test_refuses_cuda_device_without_gpu():
    with pytest.raises(UserError, match=r"training.device=cuda but no CUDA GPU is visible"):
        layout.decide(guanaco("training.device=cuda"), env={}, cuda_available=False)


def test_refuses_mixed_precision_on_cpu():
    env = dist_env(2, 0, 0, **DS, ACCELERATE_DEEPSPEED_ZERO_STAGE="2", ACCELERATE_MIXED_PRECISION="bf16")
    with pytest.raises(UserError, match=r"lorafit trains in float32 on a CPU; pass --mixed_precision no"):
        layout.decide(guanaco("quantization.compute_dtype=float32"), env=env, cuda_available=False)


def test_refusal_through_the_cli_is_one_line_and_exit_2(tmp_path):
    r = run_cli(
        ["--recipe", "llama2_guanaco", "--print-config"],
        env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"},
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("lorafit: error:")]
    assert errors == [
        "lorafit: error: DeepSpeed ZeRO stage 1 is not a lorafit layout; use launch/zero2.yaml "
        "(optimizer state and gradients sharded) or launch/zero3.yaml (weights sharded too)"
    ]
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------------------
# The shipped launch configs


def launch_env(config: Path, num_processes: int | None = 2) -> dict:
    """The environment `accelerate launch --config_file CONFIG [--num_processes N]` gives each training process,
    computed by accelerate's own launcher code (nothing is started), as on a CUDA machine: accelerate >= 1.16 turns
    `gpu_ids` into CUDA_VISIBLE_DEVICES only for the accelerator backend it detects, and on this CPU build of torch
    it detects none (seen on CI: single.yaml then left both GPUs of the simulated machine visible)."""
    from contextlib import nullcontext
    from unittest import mock

    import accelerate.utils.launch as accelerate_launch
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    as_cuda = (
        mock.patch.object(accelerate_launch, "get_torch_accelerator_backend", return_value=("cuda", None))
        if hasattr(accelerate_launch, "get_torch_accelerator_backend")
        else nullcontext()  # an accelerate without that backend lookup sets CUDA_VISIBLE_DEVICES regardless
    )
    argv = ["--config_file", str(config)] + (["--num_processes", str(num_processes)] if num_processes else [])
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args([*argv, "src/train.py"]))
    with as_cuda:
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            env = prepare_deepspeed_cmd_env(args)[1]
        elif args.multi_gpu or args.use_fsdp:
            env = prepare_multi_gpu_env(args)
        else:
            from accelerate.utils.launch import prepare_simple_launcher_cmd_env

            env = prepare_simple_launcher_cmd_env(args)[1]
    env["NPROC_PER_NODE"] = str(getattr(args, "nproc_per_node", 1))
    return env


EXPECTED = {  # config -> (layout on 2 GPUs, mixed precision, ZeRO stage)
    "single.yaml": ("single", "no", None),
    "ddp.yaml": ("ddp", "bf16", None),
    "zero2.yaml": ("zero2", "bf16", 2),
    "zero3.yaml": ("zero3", "bf16", 3),
    "zero3_offload.yaml": ("zero3", "bf16", 3),
    "cpu_ddp.yaml": ("ddp", "no", None),
    "fsdp2.yaml": ("fsdp2", "bf16", None),
}


def test_every_launch_config_is_covered():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_opens_with_purpose_and_exact_command(name):
    text = (LAUNCH / name).read_text()
    head = text.split("\n\n")[0].splitlines()
    assert head[0].startswith("# ") and len(head[0]) > 20, head[0]
    assert any(re.search(rf"accelerate launch --config_file launch/{re.escape(name)} ", line) for line in head)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_gives_the_intended_layout(name, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    kind, mp, stage = EXPECTED[name]
    env = launch_env(LAUNCH / name)
    assert env["ACCELERATE_MIXED_PRECISION"] == mp
    world = 2 if kind != "single" else 1
    cfg = guanaco("training.optimizer=adamw_torch") if "offload" in name else guanaco()
    if name == "cpu_ddp.yaml":
        cfg = guanaco("quantization.compute_dtype=float32")
        lay = layout.decide(cfg, env={**env, **dist_env(world, 1, 1)}, cuda_available=False)
        assert lay.device == "cpu"
    else:
        # on a 2-GPU machine; a config that names its GPUs makes accelerate narrow CUDA_VISIBLE_DEVICES
        visible = len(env["CUDA_VISIBLE_DEVICES"].split(",")) if "CUDA_VISIBLE_DEVICES" in env else 2
        lay = gpu(cfg, {**env, **dist_env(world, 1 % world, 1 % world)}, gpus=visible)
    assert (lay.kind, lay.zero_stage) == (kind, stage)
    if name == "single.yaml":
        assert env["CUDA_VISIBLE_DEVICES"] == "0"


@pytest.mark.parametrize("name", ["ddp.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "fsdp2.yaml"])
def test_gpu_launch_configs_default_to_one_process_per_visible_gpu(name):
    # torchrun resolves `--nproc-per-node gpu` to torch.cuda.device_count(); --num_processes still overrides it
    assert launch_env(LAUNCH / name, num_processes=None)["NPROC_PER_NODE"] == "gpu"
    assert launch_env(LAUNCH / name, num_processes=4)["NPROC_PER_NODE"] == "4"


def test_zero3_configs_gather_16bit_weights_on_save_and_init_sharded():
    for name in ("zero3.yaml", "zero3_offload.yaml"):
        env = launch_env(LAUNCH / name)
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    env = launch_env(LAUNCH / "zero3_offload.yaml")
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"]
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "cpu"


def test_one_cpu_process_uses_the_machine_cores_despite_accelerates_omp_1():
    import os

    cores = len(os.sched_getaffinity(0))
    cfg = guanaco("quantization.compute_dtype=float32")
    assert layout.decide(cfg, env={"OMP_NUM_THREADS": "1"}, cuda_available=False).cpu_threads == cores
    assert layout.decide(cfg, env={}, cuda_available=False).cpu_threads == cores
    assert layout.decide(cfg, env={"OMP_NUM_THREADS": "3"}, cuda_available=False).cpu_threads is None  # user's
    two = layout.decide(cfg, env={**dist_env(2, 0, 0), "OMP_NUM_THREADS": "1"}, cuda_available=False)
    assert two.cpu_threads is None  # several processes share the cores


# ----------------------------------------------------------------------------------------------------------------
# FSDP2

FSDP2_ENV = dict(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", ACCELERATE_MIXED_PRECISION="bf16")


def test_fsdp2_shards_the_4bit_base_as_bytes_with_no_device_map():
    lay = gpu(guanaco(), dist_env(2, 1, 1, **FSDP2_ENV), gpus=2)
    assert (lay.kind, lay.device, lay.device_map, lay.quant_storage) == ("fsdp2", "cuda:1", None, "uint8")
    assert lay.gradient_checkpointing and lay.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert lay.indexed_lm_head and any("sharded as bytes" in n for n in lay.notes)
    fast = gpu(load_recipe("llama2_guanaco_fast"), dist_env(2, 0, 0, **FSDP2_ENV), gpus=2)
    # the fused function reads the base weight without calling the module FSDP2 gathers around: PEFT's layers run
    assert not fast.fused_4bit and any("lora.fused off under FSDP2" in n for n in fast.notes)
    # bitsandbytes' kernels cannot step DTensor shards: its 32-bit AdamW becomes torch's (the same update)
    assert (lay.optimizer, fast.optimizer) == ("adamw_torch_fused", "adamw_torch_fused")
    assert gpu(guanaco(), dist_env(2, 0, 0)).optimizer == "paged_adamw_32bit"  # elsewhere the recipe's own
    with pytest.raises(UserError, match="training.optimizer=adamw_8bit runs bitsandbytes kernels"):
        gpu(guanaco("training.optimizer=adamw_8bit"), dist_env(2, 0, 0, **FSDP2_ENV), gpus=2)
    one = gpu(guanaco(), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, gpus=1)  # one GPU: a smoke run
    assert (one.kind, one.world_size) == ("fsdp2", 1)


@pytest.mark.parametrize("env, sets, message", [
    (dict(FSDP_VERSION="1"), (), "FSDP version 1 is not a lorafit layout"),
    ({}, ("quantization.quant_storage=bfloat16",), "lorafit shards the packed 4-bit weights as bytes"),
    (dict(FSDP_CPU_RAM_EFFICIENT_LOADING="true"), (), "set it to false"),
    (dict(FSDP_OFFLOAD_PARAMS="true"), (), "use launch/zero3_offload.yaml"),
    (dict(FSDP_ACTIVATION_CHECKPOINTING="true"), (), "use training.gradient_checkpointing"),
    (dict(ACCELERATE_USE_CPU="1"), (), "an FSDP launch config cannot run on accelerate's CPU path"),
])  # fmt: skip
def test_fsdp_refusals_say_what_to_use_instead(env, sets, message):
    with pytest.raises(UserError, match=re.escape(message)):
        gpu(guanaco(*sets), dist_env(2, 0, 0, **{**FSDP2_ENV, **env}), gpus=2)


def test_fsdp2_refuses_a_torch_whose_fully_shard_cannot_hold_uint8():
    # the GPU box's torch 2.11.0+cu130 failed inside fully_shard on the packed bytes (layout.FSDP2_MIN_TORCH's comment)
    with pytest.raises(UserError, match=re.escape("needs torch >= 2.13 (torch 2.11.0+cu130 cannot shard")):
        gpu(guanaco(), dist_env(2, 0, 0, **FSDP2_ENV), gpus=2, torch_version="2.11.0+cu130")
    assert gpu(guanaco(), dist_env(2, 0, 0, **FSDP2_ENV), gpus=2, torch_version="2.13.0+cpu").kind == "fsdp2"
