"""Data: read a source, turn each row into a conversation, render and tokenize it with a completion-only loss mask,
and keep the result for later runs.

    sources   what `data.path` names, read row by row with the file and row each came from
    formats   llama2 text / alpaca / messages rows -> Conversation (format detected from the columns)
    render    Conversation -> input_ids + completion_mask (Llama-2's chat format or the tokenizer's template)
    pipeline  the whole preparation (`prepare`): read, validate, split, tokenize, count
    cache     tokenized rows kept under LORAFIT_CACHE, keyed on what changes them, checked on load
    tasks     lorafit's synthetic tasks (`synthetic:<task>`)

Data flows one way through these, in that order; the names below are what the rest of lorafit uses.
"""

from lorafit.data.cache import prepare_data
from lorafit.data.formats import (
           Conversation,
           RowError,
           detect_format,
           parse_llama2,
           render_llama2_text,
           to_conversation,
)
from lorafit.data.pipeline import DataStats, Prepared, prepare
from lorafit.data.render import Encoded, Llama2Renderer, TemplateRenderer, make_renderer
from lorafit.data.sources import Rows, read_source

__all__ = ["Conversation", "DataStats", "Encoded", "Llama2Renderer", "Prepared", "Rows", "RowError", "TemplateRenderer",
           "detect_format", "make_renderer", "parse_llama2", "prepare", "prepare_data", "read_source",
           "render_llama2_text", "to_conversation"]
