"""The training collator: TRL's, plus what lorafit computes on the host for each batch (where it costs no sync).

    accelerate launch src/train.py --recipe llama2_guanaco_fast        # real tokens, label positions, fixed shapes

lorafit.trainer wraps TRL's collator in CountingCollator: the real (non-pad) tokens of the batch for tokens/s and MFU,
the labelled positions for the indexed LM head (lorafit.lm_head), and under training.cuda_graphs the padding to the
step's fixed shape (lorafit.graphs).
"""

from __future__ import annotations

from lorafit import graphs
from lorafit.lm_head import LABEL_INDEX_KEY, label_index

REAL_TOKENS_KEY = "lorafit_real_tokens"


class CountingCollator:
    """Wraps TRL's collator: counts real (non-pad) tokens of each batch on the host, where it costs no sync, and
    (index_labels) lists the labelled positions there for the indexed LM head (lorafit.lm_head.label_index)."""

    def __init__(self, inner, index_labels: bool = False):
        self.inner = inner
        self.index_labels = index_labels
        self.static = None  # (lorafit.graphs.StaticShape, pad id): fill each batch to that shape (graphs.attach)

    def __call__(self, examples):
        batch = self.inner(examples)
        batch[REAL_TOKENS_KEY] = sum(len(ex["input_ids"]) for ex in examples)
        if self.static is not None:
            graphs.pad_batch(batch, *self.static)  # before label_index: the pad adds no labelled position
        if self.index_labels:
            idx = label_index(batch)
            if idx is not None:
                batch[LABEL_INDEX_KEY] = idx
        return batch
