"""Rendering: a Conversation becomes `input_ids` and a `completion_mask` (1 = answer token, carries loss).

The mask boundary comes from tokenizing the prompt alone and prompt+answer and taking the prompt's length — the way a
prompt is tokenized at inference — never from searching for `[/INST]` token ids, which Llama-2's tokenizer splits
differently depending on what precedes them. Two renderers: Llama-2's chat format, and the tokenizer's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.data.formats import Conversation, RowError
from lorafit.errors import UserError
from lorafit.recipe import DataConfig


@dataclass
class Encoded:
    input_ids: list[int]
    completion_mask: list[int]


def _ids(tokenizer, text: str) -> list[int]:
    # verbose=False: lorafit truncates to data.max_length itself and counts it, so the tokenizer's warning about
    # model_max_length would only be noise on stderr.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _split(tokenizer, prompt: str, full: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` and of the answer that follows it in `full`.

    The answer's ids are those of `full` past the prompt's own tokenization: what a model sees at inference after
    a prompt tokenized alone. If tokenizing `full` merges across the boundary (the prompt's ids are not a prefix),
    the prompt's ids are kept and the answer is tokenized after them from the remaining text.
    """
    p = _ids(tokenizer, prompt)
    whole = _ids(tokenizer, full)
    if whole[: len(p)] == p:
        return p, whole[len(p):]
    return p, _ids(tokenizer, full[len(prompt):])


# The Llama-2 chat format as a Jinja chat template, rendering what Llama2Renderer encodes: saved with the run's
# tokenizer (adapter folder, checkpoints, merged export), so `tokenizer.apply_chat_template(messages,
# add_generation_prompt=True)` gives the token ids the run trained on. {sep} is what follows BOS: a SentencePiece
# tokenizer (Llama-2's) adds a word-start space to "[INST]" encoded on its own, as the renderer (and Meta's reference
# code) encodes it, but not after a special token in one string, so its template needs the space written out; a
# byte-level BPE tokenizer adds none.
_LLAMA2_TEMPLATE = (
    "{{%- set ns = namespace(system=none, first=true) -%}}"
    "{{%- for m in messages -%}}"
    "{{%- if m['role'] == 'system' -%}}{{%- set ns.system = m['content'] -%}}"
    "{{%- elif m['role'] == 'user' -%}}"
    "{{%- set content = m['content'] -%}}"
    "{{%- if ns.system and ns.first -%}}"
    "{{%- set content = '<<SYS>>\\n' ~ ns.system ~ '\\n<</SYS>>\\n\\n' ~ content -%}}{{%- endif -%}}"
    "{{%- set ns.first = false -%}}"
    "{{{{- bos_token ~ '{sep}[INST] ' ~ (content | trim) ~ ' [/INST]' -}}}}"
    "{{%- elif m['role'] == 'assistant' -%}}"
    "{{{{- ' ' ~ (m['content'] | trim) ~ eos_token -}}}}"
    "{{%- endif -%}}"
    "{{%- endfor -%}}"
)


def llama2_chat_template(tokenizer) -> str:
    """The Llama-2 template whose rendering this tokenizer encodes to Llama2Renderer's ids (module note above)."""
    probe = Llama2Renderer(tokenizer)
    want = probe.prompt_ids("Hello there", "Be brief.")
    for sep in ("", " "):
        template = _LLAMA2_TEMPLATE.format(sep=sep)
        got = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hello there"}],
                                            chat_template=template, tokenize=True, add_generation_prompt=True)
        if list(got["input_ids"] if hasattr(got, "keys") else got) == want:
            return template
    return _LLAMA2_TEMPLATE.format(sep="")  # the text is still Llama-2's format, if not the exact ids


class Llama2Renderer:
    """`<s>[INST] {user} [/INST] {answer} </s>` per turn, with the tokenizer's own BOS and EOS ids.

    Literal `<s>` / `</s>` in the data are parsed away (they would otherwise become a second BOS next to the one the
    tokenizer adds); each turn then starts with exactly one BOS id and each answer ends with the EOS id, as in Meta's
    Llama-2 chat format.
    """

    name = "llama2"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id

    def prompt_text(self, user: str, system: str | None, first: bool) -> str:
        if system and first:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        return f"[INST] {user.strip()} [/INST]"

    def encode(self, conv: Conversation) -> Encoded:
        ids: list[int] = []
        mask: list[int] = []
        for k, (user, answer) in enumerate(conv.turns):
            if not user and k == 0 and not conv.system:  # plain text (completion_only off): all of it is answer
                a = _ids(self.tok, answer)
                ids += self.bos + a + [self.eos]
                mask += [0] * len(self.bos) + [1] * (len(a) + 1)
                continue
            prompt = self.prompt_text(user, conv.system, k == 0)
            answer = answer.strip()
            # An empty answer renders as the prompt alone: `prompt + " "` would add a lone space token as "answer".
            p, a = _split(self.tok, prompt, f"{prompt} {answer}") if answer else (_ids(self.tok, prompt), [])
            ids += self.bos + p + a + [self.eos]
            # A turn with an empty answer (guanaco-llama2-1k row 899 has one) stays as context but carries no loss:
            # training its lone EOS would teach the model to answer some prompts with nothing.
            mask += [0] * (len(self.bos) + len(p)) + [1 if a else 0] * (len(a) + 1)
        return Encoded(ids, mask)

    def prompt_ids(self, user: str, system: str | None = None) -> list[int]:
        """What generation feeds the model for a one-turn prompt."""
        return self.bos + _ids(self.tok, self.prompt_text(user, system, True))

    @property
    def chat_template(self) -> str:
        """The Jinja chat template that renders this format for this tokenizer (saved with the run)."""
        return llama2_chat_template(self.tok)


class TemplateRenderer:
    """The tokenizer's chat template; the answer of turn k is what the template adds after the generation prompt."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.chat_template = tokenizer.chat_template  # what the run trains with, saved with it

    def _apply(self, msgs, gen: bool) -> list[int]:
        out = self.tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def _messages(self, conv: Conversation, upto: int) -> list[dict]:
        msgs = [{"role": "system", "content": conv.system}] if conv.system else []
        for user, answer in conv.turns[:upto]:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return msgs

    def encode(self, conv: Conversation) -> Encoded:
        ids: list[int] = []
        mask: list[int] = []
        rendered: list[int] = []  # the template's own tokens so far (`ids` may also hold EOS ids added below)
        for k, (user, _answer) in enumerate(conv.turns):
            prefix = self._messages(conv, k) + [{"role": "user", "content": user}]
            prompt = self._apply(prefix, gen=True)
            full = self._apply(self._messages(conv, k + 1), gen=False)
            if prompt[: len(rendered)] != rendered or full[: len(prompt)] != prompt:
                raise RowError("the chat template renders earlier turns differently once later turns are added, "
                               "so the answer boundary is ambiguous; use data.chat_template=llama2")
            answer, tail = full[len(prompt):], []
            if self.eos is not None and self.eos in answer:
                # Loss ends at the answer's EOS: what the template adds after it (ChatML's newline) is turn
                # separator, context for the next turn, and never generated (generation stops at EOS).
                cut = len(answer) - answer[::-1].index(self.eos)
                answer, tail = answer[:cut], answer[cut:]
            elif self.eos is not None:
                answer = answer + [self.eos]  # the template ends turns without EOS: add it so the model learns to stop
            ids += prompt[len(rendered):] + answer + tail
            mask += [0] * (len(prompt) - len(rendered)) + [1] * len(answer) + [0] * len(tail)
            rendered = full
        bos = self.tok.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:  # template and tokenizer both add BOS
            ids, mask = ids[1:], mask[1:]
        return Encoded(ids, mask)

    def prompt_ids(self, user: str, system: str | None = None) -> list[int]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self._apply(msgs, gen=True)


def make_renderer(tokenizer, fmt: str, cfg: DataConfig):
    """Llama-2 text rows keep Llama-2's format unless data.chat_template=tokenizer asks for the model's own template
    (the Llama-3, Qwen2.5 and Mistral recipes: guanaco's rows rendered in each family's chat format)."""
    if cfg.chat_template == "llama2" or (fmt == "llama2" and cfg.chat_template == "auto"):
        return Llama2Renderer(tokenizer)
    if cfg.chat_template == "tokenizer" or getattr(tokenizer, "chat_template", None):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("data.chat_template=tokenizer but the tokenizer has no chat template; use auto or llama2")
        return TemplateRenderer(tokenizer)
    return Llama2Renderer(tokenizer)
