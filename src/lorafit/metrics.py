"""Scoring a model's greedy answers against held-out reference answers (`eval.metric`).

    exact      the answer equals the reference, ignoring surrounding white space and case
    contains   the reference appears in the answer (same normalization): an answer with text around it counts
    regex      `eval.regex` finds the answer in each (its first group, or the whole match); those two must be equal
               (a reference the pattern does not match is taken whole)

An empty answer never scores (but an empty reference under `contains`, which would match anything, is refused at the
recipe: every reference lorafit holds is a training answer, and those are non-empty).
"""

from __future__ import annotations

import re

METRICS = ("exact", "contains", "regex")


def normalize(text: str) -> str:
    """Exact match ignores surrounding white space, repeated spaces and case, nothing else."""
    return " ".join(text.split()).lower()


def extract(pattern: re.Pattern, text: str) -> str | None:
    m = pattern.search(text)
    if m is None:
        return None
    return m.group(1) if pattern.groups else m.group(0)


def score(metric: str, answer: str, reference: str, regex: str | None = None) -> float:
    """1.0 or 0.0 for one answer (see the module docstring)."""
    a, r = normalize(answer), normalize(reference)
    if not a:
        return 0.0
    if metric == "exact":
        return float(a == r)
    if metric == "contains":
        return float(bool(r) and r in a)
    if metric == "regex":
        pattern = re.compile(regex or "")
        got = extract(pattern, answer)
        want = extract(pattern, reference)
        return float(got is not None and normalize(got) == normalize(reference if want is None else want))
    raise ValueError(f"unknown metric {metric!r}")


def mean_score(metric: str, answers: list[str], references: list[str], regex: str | None = None) -> float:
    if len(answers) != len(references):
        raise ValueError("answers and references differ in length")
    if not references:
        return 0.0
    return sum(score(metric, a, r, regex) for a, r in zip(answers, references)) / len(references)
