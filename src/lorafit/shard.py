"""FSDP2 for a 4-bit base: each bitsandbytes 4-bit linear becomes an FSDP2 unit of its own, its packed weight and its
quantization scales sharded as bytes, so every rank keeps about 1/N of the base and the bytes come back exact.

    accelerate launch --config_file launch/fsdp2.yaml src/train.py --recipe llama2_guanaco

Why lorafit writes this: with the libraries' own path the base is either not sharded or not intact.
- uint8 storage: accelerate leaves every 4-bit weight out of FSDP2 (whole on every rank; accelerate#3987, after
  uint8 weights trained to a silently wrong loss, accelerate#3983);
- storage in the compute dtype (bf16, what FSDP1 needed for its flat parameters): `fully_shard` turns each
  Params4bit into a DTensor, dropping its quantization state, and its copies canonicalize bf16 bit patterns that
  happen to be NaNs, changing packed weights (bitsandbytes#1945); the absmax scales are never sharded.
Here each 4-bit linear keeps its packed weight as plain uint8 bytes and gets its absmax scales as a second uint8
parameter (their bytes), and is `fully_shard`-ed alone, before accelerate wraps the decoder layers around it (a unit
of uniform dtype, as FSDP2 requires; integers are copied, never canonicalized). A forward pre-hook, registered after
FSDP2's own (which gathers the unit), points the module's quantization state at the gathered scales; bitsandbytes'
`fix_4bit_weight_quant_state_from_module` then gives the gathered weight that state, as it does for FSDP. The
16-value NF4 table and, with double quantization, the second-level scales are small and stay whole on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping

from lorafit.errors import UserError

ABSMAX = "lorafit_absmax_bytes"  # the parameter holding a 4-bit linear's absmax scales, as bytes



def _on(v: str | None) -> bool:
    return str(v).lower() in ("1", "true", "yes")


# FSDP2 holds the packed 4-bit bytes as uint8 parameters. torch 2.11's fully_shard creates each sharded parameter
# requiring gradients and turns that off afterwards, which an integer tensor refuses ("only Tensors of floating point
# dtype can require gradients": a one-GPU FSDP2 run on an H100 with torch 2.11.0+cu130, 2026-12-06); torch 2.13 passes
# requires_grad through (the CPU tests). 2.12 is untested, so refused with 2.11.
FSDP2_MIN_TORCH = (2, 13)


def check_fsdp_launch(env: Mapping[str, str], torch_version: str | None) -> None:
    """Refuses an FSDP launch (accelerate's environment) that cannot shard a 4-bit base correctly: the layout asks
    this before anything loads. torch_version: the installed one when None."""
    if torch_version is None:
        from importlib.metadata import version

        torch_version = version("torch")
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    if (major, minor) < FSDP2_MIN_TORCH:
        raise UserError(
            f"FSDP2 with a 4-bit base needs torch >= {'.'.join(map(str, FSDP2_MIN_TORCH))} (torch {torch_version} "
            "cannot shard the packed uint8 weights); install a newer torch, or use launch/zero3.yaml"
        )
    """FSDP2 with what works for a 4-bit base (lorafit.shard); everything else refused with what to use instead."""
    if str(env.get("FSDP_VERSION", "1")) != "2":
        raise UserError(
            "FSDP version 1 is not a lorafit layout (its flat parameters need one dtype for the packed 4-bit weights "
            "and the rest); use launch/fsdp2.yaml (FSDP2), or launch/zero3.yaml"
        )
    if _on(env.get("FSDP_CPU_RAM_EFFICIENT_LOADING")):
        raise UserError(
            "fsdp_cpu_ram_efficient_loading rebuilds every parameter from rank 0's state dict, which packed 4-bit "
            "weights and their quantization state do not survive; set it to false (launch/fsdp2.yaml: each process "
            "quantizes its copy onto its own GPU)"
        )
    if _on(env.get("FSDP_OFFLOAD_PARAMS")):
        raise UserError(
            "FSDP2 parameter offload is not a lorafit layout for a 4-bit base; use launch/zero3_offload.yaml, or "
            "launch/fsdp2.yaml without offload"
        )
    if _on(env.get("FSDP_ACTIVATION_CHECKPOINTING")):
        raise UserError(
            "fsdp_activation_checkpointing would wrap the decoder layers a second time around lorafit's 4-bit units; "
            "set it to false and use training.gradient_checkpointing (non-reentrant, which works with FSDP2)"
        )


def _absmax_to_quant_state(module, args):
    qs = module.quant_state
    qs.absmax = getattr(module, ABSMAX).view(module.lorafit_absmax_dtype)  # the gathered bytes, as scales again


def shard_4bit_linears(model, mesh=None) -> int:
    """fully_shard every bitsandbytes 4-bit linear of `model` as its own unit (see the module docstring); returns
    how many. Call after the adapters are attached and before accelerate prepares the model (which then skips these
    units and wraps the decoder layers around them). A collective per unit (FSDP2 shards at once)."""
    import bitsandbytes as bnb
    import torch
    from torch.distributed.fsdp import fully_shard

    n = 0
    for module in list(model.modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        qs = module.weight.quant_state
        module.quant_state = qs
        module.lorafit_absmax_dtype = qs.absmax.dtype
        module.register_parameter(ABSMAX, torch.nn.Parameter(qs.absmax.contiguous().view(torch.uint8),
                                                             requires_grad=False))
        module.weight = torch.nn.Parameter(module.weight.data, requires_grad=False)  # the packed bytes, plain
        fully_shard(module, mesh=mesh)  # collective: every rank shards its copy
        module.register_forward_pre_hook(_absmax_to_quant_state)  # after FSDP2's pre-forward gather
        n += 1
    return n


def is_sharded(model) -> bool:
    """Whether `model`'s trainable tensors are FSDP2 DTensors (the checks below then gather or scatter them)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters() if p.requires_grad)


def adapter_state(model) -> dict:
    """The adapter's tensors gathered whole, by parameter name, for PEFT's save_pretrained (every rank calls this: a
    collective per tensor). Only trainable tensors: a 4-bit linear's state dict would read its quantization state,
    whose gathered scales FSDP2 has freed again after the forward."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective
            out[name] = t.detach().to("cpu").clone()
    return out


def load_adapter(model, folder) -> None:
    """A checkpoint's adapter into the sharded model, each rank keeping its part (what PEFT's load_adapter does for
    a whole model; it cannot copy plain tensors into DTensors)."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    from torch.distributed.tensor import distribute_tensor

    saved = load_file(str(Path(folder) / "adapter_model.safetensors"))
    adapter = getattr(model, "active_adapter", "default")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = name.replace(f".{adapter}.", ".")  # PEFT saves names without the adapter's
            if key not in saved:
                raise RuntimeError(f"{folder}: the adapter has no {key}")  # the fingerprint check ruled this out
            full = saved[key].to(device=p.device, dtype=p.dtype)
            p.copy_(distribute_tensor(full, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else full)
