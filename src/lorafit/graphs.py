"""`training.cuda_graphs`: each decoder layer's forward and backward replayed as CUDA graphs on fixed-shape steps.

    accelerate launch src/train.py --recipe llama2_guanaco_fast --set training.cuda_graphs=true
    accelerate launch src/train.py --recipe llama2_guanaco_fast --set training.cuda_graphs=true \\
        --set quantization.fp8_matmuls=all

Why lorafit writes this: a 7B step on the fast path launches ~3,000 kernels, each costing the host 10-40 us of
Python and launch work (bench/profile_step.py); once the base GEMMs run at FP8's rate the GPU waits for the host.
A CUDA graph replays a layer's recorded kernels with one launch. torch supplies the capture and the autograd
plumbing (`torch.cuda.make_graphed_callables`); what it cannot know is how to make a packed step's shapes fixed,
which a graph needs, and when a call may take the graph. That is this module:

- `pad_batch` (the collator, on the host): a padding-free packed step holds at most `per_device_batch_size x
  max_length` tokens; it is filled to exactly that with pad tokens, as extra sequences of at most max_length tokens
  (labels -100: no loss, no gradient; attention never crosses a sequence boundary, so the real tokens compute the
  same values), and its sequence boundaries (`cu_seq_lens_q`) to a fixed count with empty sequences at the end;
  `max_length_q` becomes max_length. The count bounds every step of the data set (`static_shape`).
- `install`: each decoder layer's forward, called on such a step in training with grad enabled, replays its graphs;
  any other call (evaluation, generation, an unpadded batch) runs the layer as it is. The graphs of all layers are
  captured at the first such call, from that call's own tensors, in one memory pool (torch's rules: captured in the
  order they run, forward 0..N-1 then backward N-1..0).

Conditions (lorafit.layout refuses the others in one line): one CUDA process (no DDP, ZeRO or FSDP), packed padding-
free batches on the varlen attention, no gradient checkpointing or activation offloading (both run Python between
kernels), no torch.compile, and one micro-batch per optimizer step: the graph writes each layer's parameter
gradients into fixed buffers that autograd hands to `.grad`, which a second micro-batch would overwrite before they
are summed. Dropout inside a graph draws from the same generator, at offsets the replay advances, so its masks differ
from an eager run's; without dropout the losses are identical (tests/test_gpu.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time

log = logging.getLogger("lorafit")


@dataclasses.dataclass(frozen=True)
class StaticShape:
    tokens: int  # tokens per step: per_device_batch_size x max_length
    max_len: int  # the longest sequence, and each pad sequence's most
    seqs: int  # sequences per step, the pad sequences and the empty ones included


def static_shape(batch_size: int, max_length: int, row_seq_counts) -> StaticShape:
    """The fixed shape every step of a packed data set fits: `batch_size` rows of at most `max_length` tokens, rows
    holding `row_seq_counts` sequences each. A step's sequences are at most the `batch_size` largest counts added up,
    plus its pad sequences (at most batch_size: the pad fills at most batch_size x max_length tokens)."""
    top = sorted(row_seq_counts, reverse=True)[:batch_size]
    return StaticShape(tokens=batch_size * max_length, max_len=max_length, seqs=sum(top) + batch_size)


def pad_batch(batch: dict, shape: StaticShape, pad_id: int) -> bool:
    """Fill a padding-free batch (TRL's collator output: one row, `cu_seq_lens_q` on the host) to `shape`, in place
    (module docstring). False, leaving it unchanged, for a batch that is not padding-free or does not fit."""
    import torch

    ids, cu = batch.get("input_ids"), batch.get("cu_seq_lens_q")
    if ids is None or cu is None or ids.dim() != 2 or ids.shape[0] != 1 or "attention_mask" in batch:
        return False
    have = ids.shape[1]
    extra = shape.tokens - have
    chunks = [shape.max_len] * (extra // shape.max_len) + ([extra % shape.max_len] if extra % shape.max_len else [])
    count = cu.numel() - 1 + len(chunks)
    if extra < 0 or count > shape.seqs or int(batch.get("max_length_q", 0)) > shape.max_len:
        return False
    ends = torch.tensor(chunks, dtype=torch.int64).cumsum(0) + have
    cu = torch.cat([cu.to(torch.int64), ends, torch.full((shape.seqs - count,), shape.tokens)]).to(torch.int32)
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
    batch["max_length_q"] = batch["max_length_k"] = shape.max_len
    batch["input_ids"] = torch.cat([ids, ids.new_full((1, extra), pad_id)], dim=1)
    if "labels" in batch:
        batch["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, extra), -100)], dim=1)
    if "position_ids" in batch:
        pos = [torch.arange(n, dtype=batch["position_ids"].dtype) for n in chunks]
        batch["position_ids"] = torch.cat([batch["position_ids"], *(p[None] for p in pos)], dim=1)
    if "seq_idx" in batch:
        first = int(batch["seq_idx"].max()) + 1 if have else 0  # a CPU tensor here: no device sync
        idx = [torch.full((n,), first + i, dtype=batch["seq_idx"].dtype) for i, n in enumerate(chunks)]
        batch["seq_idx"] = torch.cat([batch["seq_idx"], *(t[None] for t in idx)], dim=1)
    return True


def why_not(cfg, on_cpu: bool, kind: str, world: int, gc: bool) -> str | None:
    """Why this launch cannot capture the step (the module docstring's conditions), or None: lorafit.layout's rule."""
    t = cfg.training
    if on_cpu:
        return "a CPU run"
    if world > 1:
        return f"{kind} runs several processes"
    if not (cfg.data.packing and cfg.model.attn_implementation == "varlen"):
        return "it needs packed varlen batches (data.packing=true, model.attn_implementation=varlen)"
    if gc:
        return "gradient checkpointing is on"
    if t.activation_offloading:
        return "training.activation_offloading is on"
    if t.torch_compile:
        return "training.torch_compile is on"
    if t.gradient_accumulation_steps > 1:
        return "training.gradient_accumulation_steps > 1"
    return None


class LayerGraphs:
    """The decoder layers' graphs and the dispatch that takes them (install)."""

    def __init__(self, layers, shape: StaticShape, placeholder_mask):
        self.layers = list(layers)
        self.shape = shape
        self.mask = placeholder_mask
        self.graphed = None  # one graphed callable per layer, after capture
        self.needs_grad_in: list[bool] = []
        self.replays = 0  # steps that took the graphs (the tests read it)
        self.device_type = "cuda"  # where graphs exist; the CPU tests stand a stub in for the capture
        self.said_eager = False
        self.shared = None  # (cos, sin, cu_seq_lens): the graphs' one input buffer of each, after capture

    def training_call(self, layer, hidden) -> bool:
        """A training forward with grad enabled on the graphs' device: one that should take the graphs."""
        import torch

        return layer.training and torch.is_grad_enabled() and hidden.device.type == self.device_type

    def fixed_shape(self, hidden, args, kw) -> bool:
        """The call has the step's fixed shape and the varlen kwargs the graphs were captured with."""
        cu = kw.get("cu_seq_lens_q")
        s = self.shape
        return (not args and kw.get("attention_mask") is self.mask and cu is not None and cu.numel() == s.seqs + 1
                and kw.get("max_length_q") == s.max_len and hidden.dim() == 3 and hidden.shape[:2] == (1, s.tokens)
                and not kw.get("use_cache") and kw.get("cache") is None and kw.get("past_key_values") is None
                and kw.get("position_embeddings") is not None)

    def capture(self, hidden, cos, sin, cu) -> None:
        """Every layer's graphs, from copies of this call's inputs (their buffers become the graphs' inputs). The
        rotary tables and the sequence boundaries are the same for every layer of a step: one buffer each, shared by
        all the graphs, which layer 0's replay fills and the later layers are handed as they are (no copy)."""
        import torch

        steps = tuple(_layer_step_class()(layer, self.mask, self.shape.max_len) for layer in self.layers)
        self.shared = (cos.detach().clone(), sin.detach().clone(), cu.detach().clone())
        grad_in = hidden.requires_grad
        samples, self.needs_grad_in = [], []
        for layer in self.layers:
            self.needs_grad_in.append(grad_in)
            samples.append((hidden.detach().clone().requires_grad_(grad_in), *self.shared))
            grad_in = grad_in or any(p.requires_grad for p in layer.parameters())
        # torch refuses autocast's weight cache during capture (a cached cast would outlive its graph's memory)
        ctx = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
               if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
        start = time.perf_counter()
        with ctx:
            # host-device syncs, once per run: torch synchronizes before and after the warm-up passes
            self.graphed = torch.cuda.make_graphed_callables(steps, tuple(samples), num_warmup_iters=2)
        log.info("CUDA graphs: captured %d decoder layers in %.1f s", len(steps), time.perf_counter() - start)

    def forward(self, index: int, original, hidden, *args, **kw):
        """Layer `index`'s forward: its graphs on a training call of the fixed shape (captured at the first, by layer
        0), else `original`, the layer's own forward."""
        layer = self.layers[index]
        if not self.training_call(layer, hidden):
            return original(hidden, *args, **kw)
        if not self.fixed_shape(hidden, args, kw):
            if index == 0 and not self.said_eager:
                self.said_eager = True  # a training step the collator did not pad (the bound should prevent it)
                log.warning("CUDA graphs: a training step of %d tokens did not have the fixed shape (%d tokens, %d "
                            "sequences) and ran without them", hidden.shape[-2], self.shape.tokens, self.shape.seqs)
            return original(hidden, *args, **kw)
        if self.graphed is None:
            if index != 0:
                return original(hidden, *args, **kw)
            self.capture(hidden, *kw["position_embeddings"], kw["cu_seq_lens_q"])
        if hidden.requires_grad != self.needs_grad_in[index]:
            return original(hidden, *args, **kw)
        self.replays += index == 0
        # layer 0 copies the step's tables and boundaries into the shared buffers; the later layers read them there
        shared = (*kw["position_embeddings"], kw["cu_seq_lens_q"]) if index == 0 else self.shared
        return self.graphed[index](hidden, *shared)  # the graph copies in what is not its own buffer; no sync


def install(model, shape: StaticShape) -> LayerGraphs:
    """Route each decoder layer of `model` (a PEFT or transformers causal LM whose attention is lorafit's varlen) through
    LayerGraphs (module docstring). Returns it."""
    from lorafit.attention import _no_mask

    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.get_base_model().get_decoder().layers
    graphs = LayerGraphs(layers, shape, _no_mask())
    for i, layer in enumerate(graphs.layers):
        original = type(layer).forward.__get__(layer)
        layer.forward = functools.partial(graphs.forward, i, original)
    return graphs


@functools.cache
def _layer_step_class():
    import torch

    class LayerStep(torch.nn.Module):
        """A decoder layer called with tensors only (make_graphed_callables' rule) and the step's fixed arguments;
        the layer's own forward, not the dispatch install() put in front of it."""

        def __init__(self, layer, mask, max_len: int):
            super().__init__()
            self.layer, self.mask, self.max_len = layer, mask, max_len

        def forward(self, hidden, cos, sin, cu):
            out = type(self.layer).forward(self.layer, hidden, attention_mask=self.mask,
                                           position_embeddings=(cos, sin), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                           max_length_q=self.max_len, max_length_k=self.max_len)
            return out[0] if isinstance(out, tuple) else out

    return LayerStep


def attach(trainer, batch_size: int, max_length: int, pad_id: int) -> LayerGraphs | None:
    """Give `trainer` (a LorafitTrainer on a packed data set) fixed-shape steps and graphed decoder layers: the shape
    from the packed rows' sequence counts (TRL's `seq_lengths` column), the collator's padding, the layers' dispatch.
    None, with a log line, where the data set does not list its rows' sequences (then every step runs eagerly)."""
    data = trainer.train_dataset
    if "seq_lengths" not in (getattr(data, "column_names", None) or ()):
        log.info("CUDA graphs off: the packed data set has no seq_lengths column to bound a step's sequences")
        return None
    shape = static_shape(batch_size, max_length, [len(s) for s in data["seq_lengths"]])
    trainer.data_collator.static = (shape, pad_id)
    graphs = install(trainer.model, shape)
    log.info("CUDA graphs: %d decoder layers, captured at the first step; every step padded to %d tokens in %d "
             "sequences", len(graphs.layers), shape.tokens, shape.seqs)
    return graphs
