"""The training loss's LM head on positions the collator lists on the host (the layout's `indexed_lm_head`).

    accelerate launch src/train.py --recipe llama2_guanaco_fast        # on wherever the layout allows (not ZeRO-3)

Why lorafit writes it: TRL's
fused LM head (`trl.trainer.utils.add_fused_lm_head`) scores only the labelled positions, which it selects with
boolean masks on the device (`hidden_states[mask]`, then `masked_scatter` back): four host-device syncs per micro-
step (two `nonzero` in the forward, two in the backward; `bench/profile_step.py --sync-audit`), and it
also computes the entropy and top-1 flags its metrics use. lorafit's collator computes the labelled positions on
the host (`label_index`), and the head gathers them with `index_select` (no sync either way) and runs TRL's own
kernel (`trl.kernels.ChunkedLogProbFunction`) for the log-probabilities alone.
"""

from __future__ import annotations

import functools

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
    (module docstring). Any other call goes to the wrapped forward unchanged. Returns False, installing nothing,
    where the wrapped forward would do more than a plain LM head: a logit softcap or scale, MoE router losses, or a
    TRL without the kernel."""
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
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head: gathered whole once per call, as TRL's head does
            weight = weight.full_tensor()  # collective
            bias = bias.full_tensor() if bias is not None else None
        idx = lorafit_label_index.to(hidden.device, non_blocking=True)  # on the device already (the batch's copy)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx).to(weight.device)
        targets = labels.reshape(-1).index_select(0, idx).to(weight.device)
        log_probs = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, chunk, None, 1.0,
                                                 ("log_probs",))[0]
        # idx.numel() is host metadata: the mean needs no count from the device
        return CausalLMOutput(loss=-log_probs.sum() / (max(idx.numel(), 1) if num_items is None else num_items))

    causal_lm.forward = forward
    return True
