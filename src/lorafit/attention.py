"""`model.attn_implementation=varlen`: attention over padding-free batches with PyTorch's own variable-length flash
kernel (`torch.nn.attention.varlen.varlen_attn`, FlashAttention-2 built into torch).

    accelerate launch src/train.py --recipe llama2_guanaco_fast        # packing + varlen
    accelerate launch src/train.py --recipe llama2_guanaco --set data.padding_free=true \
        --set model.attn_implementation=varlen

Why lorafit writes it: transformers can reach a
varlen kernel only through the flash-attn package or hub kernels (neither installs offline or on every CUDA
build), and its flex_attention path compiles a block mask per batch (a host-device sync and ~0.8 ms of dynamo
call overhead per layer on an H100, bench/profile_step.py). TRL's padding-free collator already computes the
sequence boundaries on the CPU (`cu_seq_lens_q`, `max_length_q`), so the kernel needs no sync at all. Batches
without those boundaries (padded evaluation batches, generation with a KV cache) go to transformers' sdpa with
the mask transformers builds for it. On a CPU the same function attends each packed row separately with sdpa:
correct, slow, and there so the path is tested where CI runs.
The same attention also skips transformers' mask construction for those batches (`skip_mask_building`):
transformers inspects the position ids of every forward for packed rows, `.all()` on a device tensor (a host-device
sync at the start of each forward, `masking_utils.find_packed_sequence_indices`), then builds a (tokens x tokens)
boolean mask for sdpa that the varlen kernel never reads.
"""

from __future__ import annotations

import functools
import inspect

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


@functools.cache
def _no_mask():
    """The 4-D "mask" skip_mask_building hands transformers for padding-free batches: transformers returns a 4-D mask
    as it is, without inspecting the position ids; only varlen_attention_forward receives it, and it never reads it.
    One tensor, on the CPU: it never reaches a kernel."""
    import torch

    return torch.ones((1, 1, 1, 1), dtype=torch.bool)


def config_window(config) -> int | None:
    """The sliding window some layer of this model attends with, or None: transformers 5 names each layer's kind
    (`layer_types`); Qwen2 configs carry a `sliding_window` they do not use (`use_sliding_window: false`)."""
    sw = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return sw if "sliding_attention" in types else None
    return sw if getattr(config, "use_sliding_window", True) else None


def effective_window(window: int | None, max_len: int) -> int | None:
    """A sliding window no shorter than the longest packed row never cuts anything off: then no window at all."""
    return window if window and window < max_len else None


def window_supported(on_cuda: bool) -> bool:
    """Whether this attention can apply a sliding window itself: the CPU reference can; on CUDA, torch's varlen
    kernel where it takes `window_size` (2.13 does)."""
    return not on_cuda or "window_size" in _varlen_params()


def skip_mask_building(model):
    """A forward pre-hook on the model's decoder stack: a padding-free batch that the varlen kernel will attend
    (`cu_seq_lens_q`, one packed row, no KV cache, no attention dropout, a sliding window the kernel applies or one
    longer than every row) goes in with a placeholder 4-D mask, so transformers neither syncs on its position ids nor
    builds a mask nobody reads (module docstring). Every other batch passes unchanged and gets transformers' mask.
    Returns the hook's handle."""
    decoder = model.get_decoder()
    config = decoder.config
    window = config_window(config)

    def pre_hook(module, args, kwargs):
        if args or kwargs.get("cu_seq_lens_q") is None or kwargs.get("attention_mask") is not None:
            return None
        if kwargs.get("use_cache") or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            return None
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if x is None or x.shape[0] != 1:
            return None
        max_len = kwargs.get("max_length_q")
        if window and (max_len is None or effective_window(window, int(max_len))) and not window_supported(x.is_cuda):
            return None
        if module.training and getattr(config, "attention_dropout", 0.0):
            return None
        return args, {**kwargs, "attention_mask": _no_mask()}

    return decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query/key/value (batch, heads, seq, head_dim) -> (batch, seq, heads,
    head_dim), None. Runs the varlen kernel on a padding-free batch (batch 1 with `cu_seq_lens_q`), with the layer's
    sliding window where it has one that is shorter than the longest packed row."""
    cu = kwargs.get("cu_seq_lens_q")
    window = None
    if cu is not None and kwargs.get("max_length_q") is not None:  # a host int: TRL's collator computes it
        window = effective_window(getattr(module, "sliding_window", None) or kwargs.get("sliding_window"),
                                  int(kwargs["max_length_q"]))
    if (cu is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or dropout
            or (window and not window_supported(query.is_cuda))):
        if attention_mask is not None and attention_mask is _no_mask():
            raise RuntimeError("lorafit.attention: a batch given the varlen placeholder mask is not one the varlen "
                               "kernel attends; skip_mask_building's conditions are out of step with this function")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k, v = (t.transpose(1, 2)[0] for t in (query, key, value))  # (total tokens, heads, head_dim), views
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu, int(kwargs["max_length_q"]), scale, window)
    else:
        out = _reference_varlen(q, k, v, cu, scale, window)
    return out.unsqueeze(0), None


def _reference_varlen(q, k, v, cu, scale, window: int | None = None):
    """Each packed row attended on its own with sdpa (causal; with a sliding window, each token sees itself and the
    `window - 1` before it, transformers' semantics): the kernel's, for CPUs and tests."""
    import torch

    bounds = cu.tolist()  # a CPU tensor here: no device sync
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:  # an empty sequence (lorafit.graphs pads the count with them): nothing to attend
            continue
        kw = {"is_causal": True}
        if window:
            i = torch.arange(e - s, device=q.device)
            kw = {"attn_mask": (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)}
        o = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), scale=scale, enable_gqa=gqa, **kw)
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


def _flash_varlen(q, k, v, cu, max_len: int, scale: float, window: int | None = None):
    import torch
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    # Releases differ: some take is_causal=, newer ones (2.13 here) express causality as window_size=(-1, 0) and a
    # sliding window as (window - 1, 0) (the token itself and window - 1 before it: transformers' semantics); the
    # signature decides. The GPU tests ran this on torch 2.11 against each row attended alone.
    if window:
        kw = {"window_size": (window - 1, 0)}  # window_supported() checked that this torch takes it
    else:
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
