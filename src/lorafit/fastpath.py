"""Pieces of the fast path that lorafit writes itself, because the libraries that own the job fall short there.

    accelerate launch src/train.py --recipe llama2_guanaco_fast        # uses all three pieces below
    accelerate launch src/train.py --recipe llama2_guanaco --set data.padding_free=true --set model.attn_implementation=varlen

1. `model.attn_implementation=varlen`: attention over padding-free batches with PyTorch's own variable-length flash
   kernel (`torch.nn.attention.varlen.varlen_attn`, FlashAttention-2 built into torch). transformers can reach a
   varlen kernel only through the flash-attn package or hub kernels (neither installs offline or on every CUDA
   build), and its flex_attention path compiles a block mask per batch (a host-device sync and ~0.8 ms of dynamo
   call overhead per layer on an H100, docs/benchmarks.md call H). TRL's padding-free collator already computes the
   sequence boundaries on the CPU (`cu_seq_lens_q`, `max_length_q`), so the kernel needs no sync at all. Batches
   without those boundaries (padded evaluation batches, generation with a KV cache) go to transformers' sdpa with
   the mask transformers builds for it. On a CPU the same function attends each packed row separately with sdpa:
   correct, slow, and there so the path is tested where CI runs.
   The same attention also skips transformers' mask construction for those batches (`skip_mask_building`):
   transformers inspects the position ids of every forward for packed rows, `.all()` on a device tensor (a host-device
   sync at the start of each forward, `masking_utils.find_packed_sequence_indices`), then builds a (tokens x tokens)
   boolean mask for sdpa that the varlen kernel never reads.
2. The training loss's LM head (`install_indexed_lm_head`, the `indexed_lm_head` decision in lorafit.layout): TRL's
   fused LM head (`trl.trainer.utils.add_fused_lm_head`) scores only the labelled positions, which it selects with
   boolean masks on the device (`hidden_states[mask]`, then `masked_scatter` back): four host-device syncs per micro-
   step (two `nonzero` in the forward, two in the backward; `bench/profile_step.py --sync-audit`, call U), and it
   also computes the entropy and top-1 flags its metrics use. lorafit's collator computes the labelled positions on
   the host (`label_index`), and the head gathers them with `index_select` (no sync either way) and runs TRL's own
   kernel (`trl.kernels.ChunkedLogProbFunction`) for the log-probabilities alone.
3. `training.optimizer=lorafit_adamw_32bit`: bitsandbytes' 32-bit AdamW, the kernel and float32 state of the seed's
   paged_adamw_32bit, kept in ordinary GPU memory and stepped without bitsandbytes' host-device sync after every
   tensor. bitsandbytes 0.50 (`optim/optimizer.py`, `Optimizer8bit.step`) calls `torch.cuda.synchronize()` after
   each parameter, paged or not; the sync is needed only for paged state, whose prefetches are asynchronous. With
   LoRA on q,v of a 7B that is 128 syncs per optimizer step, each draining the GPU's queue (call H profile). It also
   steps each parameter group as one flat tensor: one kernel launch instead of one per LoRA tensor, the same values.
"""

from __future__ import annotations

import functools
import inspect
import os

# torch is imported inside the functions: lorafit.layout and lorafit.model import this module, and `--print-config`
# / `--plan` must stay fast.
ATTN_NAME = "lorafit_varlen"  # the name registered in transformers' attention interfaces


def register_varlen_attention() -> str:
    """Register lorafit's varlen attention with transformers (idempotent); returns the implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    # The mask for the batches that fall back to sdpa (padded, or decoding with a cache) is exactly sdpa's.
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTN_NAME


def bench_off(piece: str) -> bool:
    """LORAFIT_BENCH_OFF=mask_skip/indexed_lm_head turns those pieces off, so that bench/throughput.py measures each
    on and off side by side (`+env:LORAFIT_BENCH_OFF=...`; "/" because its run list is comma-separated). Not a recipe
    field: neither changes what is computed, so a user has no reason to turn one off."""
    return piece in os.environ.get("LORAFIT_BENCH_OFF", "").replace(",", "/").split("/")


@functools.cache
def _no_mask():
    """The 4-D "mask" skip_mask_building hands transformers for padding-free batches: transformers returns a 4-D mask
    as it is, without inspecting the position ids; only varlen_attention_forward receives it, and it never reads it.
    One tensor, on the CPU: it never reaches a kernel."""
    import torch

    return torch.ones((1, 1, 1, 1), dtype=torch.bool)


def skip_mask_building(model):
    """A forward pre-hook on the model's decoder stack: a padding-free batch that the varlen kernel will attend
    (`cu_seq_lens_q`, one packed row, no KV cache, no attention dropout, no sliding window) goes in with a placeholder
    4-D mask, so transformers neither syncs on its position ids nor builds a mask nobody reads (module docstring).
    Every other batch passes unchanged and gets transformers' mask. Returns the hook's handle, or None where a
    benchmark turned it off (`bench_off`)."""
    if bench_off("mask_skip"):
        return None
    decoder = model.get_decoder()
    config = decoder.config

    def pre_hook(module, args, kwargs):
        if args or kwargs.get("cu_seq_lens_q") is None or kwargs.get("attention_mask") is not None:
            return None
        if kwargs.get("use_cache") or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            return None
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if x is None or x.shape[0] != 1 or getattr(config, "sliding_window", None):
            return None
        if module.training and getattr(config, "attention_dropout", 0.0):
            return None
        return args, {**kwargs, "attention_mask": _no_mask()}

    return decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query/key/value (batch, heads, seq, head_dim) -> (batch, seq, heads,
    head_dim), None. Runs the varlen kernel on a padding-free batch (batch 1 with `cu_seq_lens_q`)."""
    cu = kwargs.get("cu_seq_lens_q")
    if (cu is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or dropout
            or getattr(module, "sliding_window", None) or kwargs.get("sliding_window")):
        if attention_mask is not None and attention_mask is _no_mask():
            raise RuntimeError("lorafit.fastpath: a batch given the varlen placeholder mask is not one the varlen "
                               "kernel attends; skip_mask_building's conditions are out of step with this function")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k, v = (t.transpose(1, 2)[0] for t in (query, key, value))  # (total tokens, heads, head_dim), views
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu, int(kwargs["max_length_q"]), scale)
    else:
        out = _reference_varlen(q, k, v, cu, scale)
    return out.unsqueeze(0), None


def _reference_varlen(q, k, v, cu, scale):
    """Each packed row attended on its own with sdpa (causal): the semantics of the kernel, for CPUs and tests."""
    import torch

    bounds = cu.tolist()  # a CPU tensor here: no device sync
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        o = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, scale=scale,
            enable_gqa=gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0)


@functools.cache
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_available() -> bool:
    try:
        _varlen_params()
    except ImportError:
        return False
    return True


def _flash_varlen(q, k, v, cu, max_len: int, scale: float):
    import torch
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    # Releases differ: some take is_causal=, newer ones (2.13 here) express causality as window_size=(-1, 0); the
    # signature decides. The GPU tests ran this on torch 2.11 against each row attended alone.
    kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "scale" in params:
        kw["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise RuntimeError(f"this torch's varlen_attn has no scale argument; the model needs scale {scale}")
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu = cu if cu.dtype == torch.int32 else cu.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


LABEL_INDEX_KEY = "lorafit_label_index"  # the collator's key for label_index's tensor


def label_index(batch: dict):
    """On the host, in the collator: the flat positions of the tokens the loss scores, in the order the indexed head
    reads the hidden states (rows x (length - 1) with the labels shifted by one; rows x length where the collator gave
    `shift_labels`). A CPU tensor: computing it costs the GPU nothing; it reaches the GPU with the batch."""
    shift, labels = batch.get("shift_labels"), batch.get("labels")
    if shift is not None:
        flat = shift.reshape(-1)
    elif labels is not None and labels.dim() == 2:
        flat = labels[:, 1:].reshape(-1)
    else:
        return None
    return (flat != -100).nonzero().squeeze(1)  # a CPU tensor here: no device sync


def install_indexed_lm_head(causal_lm) -> bool:
    """Wraps the causal LM's forward (TRL's fused-head forward, which SFTTrainer installed) so that a call carrying
    `lorafit_label_index` returns only the training loss, computed on the labelled positions that index selects
    (module docstring, 2). Any other call goes to the wrapped forward unchanged. Returns False, installing nothing,
    where the wrapped forward would do more than a plain LM head: a logit softcap or scale, MoE router losses, or a
    TRL without the kernel (or where a benchmark turned it off, `bench_off`)."""
    if bench_off("indexed_lm_head"):
        return False
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError:
        return False
    text = causal_lm.config.get_text_config()
    if any(getattr(text, a, None) is not None for a in ("final_logit_softcapping", "logit_scale", "output_multiplier",
                                                         "lm_head_multiplier", "logits_scaling")):
        return False
    if getattr(text, "output_router_logits", False):
        return False
    from transformers.modeling_outputs import CausalLMOutput

    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768  # TRL 1.16's vocabulary tile
    wrapped = causal_lm.forward

    @functools.wraps(wrapped)
    def forward(*args, lorafit_label_index=None, **kwargs):
        if lorafit_label_index is None:
            return wrapped(*args, **kwargs)
        labels, shift = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("fused_lm_head", None)
        kwargs["use_cache"] = False
        hidden = causal_lm.base_model(*args, **kwargs).last_hidden_state  # the decoder stack, as TRL calls it
        if shift is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift
        head = causal_lm.get_output_embeddings()
        idx = lorafit_label_index.to(hidden.device, non_blocking=True)  # on the device already (the batch's copy)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx).to(head.weight.device)
        targets = labels.reshape(-1).index_select(0, idx).to(head.weight.device)
        log_probs = ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, targets, 1.0, chunk, None, 1.0,
                                                 ("log_probs",))[0]
        # idx.numel() is host metadata: the mean needs no count from the device
        return CausalLMOutput(loss=-log_probs.sum() / (max(idx.numel(), 1) if num_items is None else num_items))

    causal_lm.forward = forward
    return True


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
            on every linear; ~60 us of host time each on an H200, docs/benchmarks.md call Q2). bitsandbytes' 32-bit
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
