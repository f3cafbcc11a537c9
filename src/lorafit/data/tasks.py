"""Built-in synthetic tasks: deterministic instruction data that lorafit generates itself (`data.path=synthetic:<task>`).

The quickstart teaches SmolLM2-135M-Instruct a skill it does not have and that is checked by exact match:
`reverse-words` — "Reverse the order of these words: lamp river stone" -> "stone river lamp". The base model
rambles or reorders wrongly; a few dozen QLoRA steps on CPU teach it the exact output (eval.metric=exact, which
`auto` picks for synthetic data).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# Short, common English words: each is one or two tokens for SmolLM2's and Llama-2's tokenizers, so rows stay short.
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "chair", "green", "music", "paper", "window", "silver", "garden", "horse", "bread", "candle", "ocean", "pencil", "rocket", "yellow", "forest", "mirror", "planet", "button", "coffee", "dragon", "guitar", "island", "jacket", "kettle", "lemon", "marble", "needle", "orange", "pillow", "rabbit", "saddle", "tomato", "violin", "wallet"]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def reverse_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return Example(f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)))


TASKS: dict[str, Callable[[random.Random], Example]] = {"reverse-words": reverse_words}


def generate(task: str, rows: int, seed: int) -> list[Example]:
    """`rows` distinct examples of `task`, the same for the same seed on every machine."""
    if task not in TASKS:
        from lorafit.errors import UserError

        raise UserError(f"unknown synthetic task '{task}' in data.path; available: {', '.join(sorted(TASKS))}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    make = TASKS[task]
    for _ in range(rows * 50):  # the reverse-words space (~1e8 prompts) is far larger than any row count asked for
        ex = make(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
            if len(out) == rows:
                break
    return out
