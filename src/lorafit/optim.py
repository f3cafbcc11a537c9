"""Optimizer pieces lorafit writes itself: `training.optimizer=lorafit_adamw_32bit`, and re-paging a restored
bitsandbytes paged optimizer's state.

    accelerate launch src/train.py --recipe llama2_guanaco_fast        # lorafit_adamw_32bit

`lorafit_adamw_32bit` is bitsandbytes' 32-bit AdamW, the kernel and float32 state of the seed's
paged_adamw_32bit, kept in ordinary GPU memory and stepped without bitsandbytes' host-device sync after every
tensor. bitsandbytes 0.50 (`optim/optimizer.py`, `Optimizer8bit.step`) calls `torch.cuda.synchronize()` after
each parameter, paged or not; the sync is needed only for paged state, whose prefetches are asynchronous. With
LoRA on q,v of a 7B that is 128 syncs per optimizer step, each draining the GPU's queue (bench/profile_step.py). It also
steps each parameter group as one flat tensor: one kernel launch instead of one per LoRA tensor, the same values.
"""

from __future__ import annotations

import functools

from lorafit.errors import UserError

# transformers' optimizer names that run bitsandbytes kernels on the GPU (paged or 8-bit state, Lion, AdEMAMix).
BNB_OPTIMIZERS = frozenset(
    {
        "adamw_bnb_8bit",
        "adamw_8bit",
        "ademamix",
        "ademamix_8bit",
        "lion_8bit",
        "lion_32bit",
        "paged_adamw_32bit",
        "paged_adamw_8bit",
        "paged_ademamix_32bit",
        "paged_ademamix_8bit",
        "paged_lion_32bit",
        "paged_lion_8bit",
        "rmsprop_bnb",
        "rmsprop_bnb_8bit",
        "rmsprop_bnb_32bit",
        "lorafit_adamw_32bit",  # lorafit.optim: bitsandbytes' 32-bit AdamW without the per-tensor sync
    }
)

# bitsandbytes' 32-bit AdamW and lorafit's sync-free one compute torch's AdamW update (float32 state, decoupled weight
# decay); torch's steps FSDP2's DTensor shards, which bitsandbytes' kernels cannot take.
_TORCH_TWIN = {"paged_adamw_32bit": "adamw_torch", "lorafit_adamw_32bit": "adamw_torch"}


def optimizer_for_dtensor(name: str, on_cpu: bool) -> tuple[str, str | None]:
    """The optimizer that steps FSDP2's sharded parameters for `training.optimizer=name`, and a note if it changed."""
    if name not in BNB_OPTIMIZERS:
        return name, None
    if name not in _TORCH_TWIN:
        raise UserError(
            f"training.optimizer={name} runs bitsandbytes kernels, which cannot step FSDP2's sharded (DTensor) "
            "parameters and have no torch twin with the same state; set --set training.optimizer=adamw_torch, or "
            "use launch/zero3.yaml"
        )
    twin = _TORCH_TWIN[name] + ("" if on_cpu else "_fused")
    return twin, (
        f"training.optimizer {name} -> {twin} under FSDP2 (the same AdamW update; bitsandbytes' kernels "
        "cannot step DTensor shards)"
    )



@functools.cache
def adamw_32bit_nosync():
    """The optimizer class behind `lorafit_adamw_32bit` (built on first use: bitsandbytes imports slowly)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch

    class AdamW32bitNoSync(bnb.optim.AdamW32bit):
        """bitsandbytes' AdamW32bit with its own state and kernel, unpaged, stepped without a sync per tensor, and
        each parameter group stepped as one flat tensor (see `_step_flat`)."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=32,
                             is_paged=False)
            self._flat: dict[int, dict] = {}

        def load_state_dict(self, state_dict, *args, **kwargs):
            super().load_state_dict(state_dict, *args, **kwargs)
            self._flat = {}  # the restored moments are new tensors: the next step gathers them into new flat buffers

        @torch.no_grad()
        def step(self, closure=None):
            # Optimizer8bit.step of bitsandbytes 0.50 without its sync_gpu(p) calls (see the module docstring); the
            # kernels it launches are the same, on the same stream, in the same order.
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                if self._step_flat(gindex, group):
                    continue
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

        def _step_flat(self, gindex, group) -> bool:
            """One kernel launch for the whole group instead of one per tensor (128 LoRA tensors of a 7B on q,v, 448
            on every linear; ~60 us of host time each on an H200, bench/profile_step.py). bitsandbytes' 32-bit
            Adam kernel is elementwise (no per-tensor reduction without max_unorm), so updating the concatenation
            is the per-tensor update, bit for bit: the moments live in one float32 buffer per group, each
            parameter's state being a view of it; gradients and parameters are gathered into flat buffers, stepped,
            and the parameters copied back (one multi-tensor copy). Groups this cannot cover (mixed dtypes or
            devices, a missing gradient, per-parameter overrides, max_unorm) take bitsandbytes' per-tensor path."""
            params = group["params"]
            if len(params) < 2 or any(p.grad is None or p.grad.dtype != p.dtype for p in params):
                return False
            flat = self._flat.get(gindex)
            if (flat is None or flat["ids"] != [id(p) for p in params]
                    or (flat["ok"] and (self.state[params[0]]["state1"].data_ptr() != flat["s1"].data_ptr()
                                        or self.state[params[-1]]["state2"].data_ptr() != flat["s2_last"]))):
                flat = self._flat[gindex] = self._build_flat(gindex, group)  # first step, or the state was replaced
            if not flat["ok"]:
                return False
            steps = {self.state[p]["step"] for p in params}
            if len(steps) != 1:  # a step that some tensors missed (a None gradient): bitsandbytes' path keeps count
                return False
            torch.cat([p.grad.reshape(-1) for p in params], out=flat["g"])
            torch.cat([p.reshape(-1) for p in params], out=flat["p"])
            config = self.get_config(gindex, 0, group)
            step = steps.pop() + 1
            bnbf.optimizer_update_32bit(
                self.optimizer_name, flat["g"], flat["p"], flat["s1"], config["betas"][0], config["eps"],
                step, config["lr"], flat["s2"], config["betas"][1],
                config["betas"][2] if len(config["betas"]) >= 3 else 0.0, config.get("alpha", 0.0),
                config["weight_decay"], 1.0, None, max_unorm=0.0, skip_zeros=False)
            torch._foreach_copy_(params, flat["p_views"])
            for p in params:
                self.state[p]["step"] = step
            return True

        def _build_flat(self, gindex, group) -> dict:
            """The group's flat buffers, or {"ok": False} for a group this path cannot cover (checked once here, not
            at every step: dtypes, devices and overrides do not change between steps)."""
            params = group["params"]
            ids = [id(p) for p in params]
            p0 = params[0]
            if (self.args.max_unorm > 0 or self.args.skip_zeros
                    or any(p.dtype != p0.dtype or p.device != p0.device for p in params)
                    or any((gindex, i) in self.mng.index2config or i_d in self.mng.pid2config
                           for i, i_d in enumerate(ids))):
                return {"ids": ids, "ok": False}
            sizes = [p.numel() for p in params]
            for pindex, p in enumerate(params):
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
            flat = {"ids": ids, "ok": True,
                    "g": torch.empty(sum(sizes), dtype=p0.dtype, device=p0.device),
                    "p": torch.empty(sum(sizes), dtype=p0.dtype, device=p0.device)}
            for key in ("state1", "state2"):
                buf = torch.cat([self.state[p][key].reshape(-1).float() for p in params])
                flat["s1" if key == "state1" else "s2"] = buf
                for p, view in zip(params, buf.split(sizes)):
                    self.state[p][key] = view.view(p.shape)  # the per-parameter state HF saves and restores
            flat["s2_last"] = self.state[params[-1]]["state2"].data_ptr()
            flat["p_views"] = [v.view(p.shape) for p, v in zip(params, flat["p"].split(sizes))]
            return flat

    return AdamW32bitNoSync


LORAFIT_OPTIMIZERS = {"lorafit_adamw_32bit": adamw_32bit_nosync}


def repage_optimizer_state(optimizer) -> int:
    """Give a restored bitsandbytes paged optimizer real paged state again; returns how many tensors were re-paged.

    Why this exists: a paged optimizer's state lives in CUDA managed memory and carries the Python attributes
    `is_paged` and `page_deviceid`. torch.save pickles those attributes and torch.load restores them on whatever
    tensor it builds: HF loads optimizer.pt onto each rank's GPU under DDP (onto the CPU with one process), so the
    restored state is ordinary memory still flagged as paged, with the device id of the rank that saved it. The next
    step asks CUDA to prefetch it to that device, and on rank 1 of 2 H100s bitsandbytes stopped with "Error invalid
    argument at line 578 in file /src/csrc/pythonInterface.cpp" (bitsandbytes issues #782 and #1708; not fixed in
    0.50.2). Here each such tensor is copied into a fresh paged buffer on its parameter's device, exactly what the
    optimizer would have allocated itself; where paging is unavailable (CPU parameters: bitsandbytes falls back to
    unpaged there) the stale flag is dropped instead."""
    import torch

    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    if not getattr(opt, "is_paged", False):
        return 0
    repaged = 0
    for param, state in opt.state.items():
        if not isinstance(param, torch.Tensor):
            continue
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor) or not getattr(value, "is_paged", False):
                continue
            if param.device.type == "cuda":
                from bitsandbytes import functional as bnbF

                buf = bnbF.get_paged(*value.shape, dtype=value.dtype, device=param.device)
                buf.copy_(value)  # host-device copy, once per state tensor at resume
                opt.page_mng.paged_tensors.append(buf)
                state[key] = buf
                repaged += 1
            else:
                del value.is_paged
                value.__dict__.pop("page_deviceid", None)
    return repaged
