"""Dotted keys, their declared types, and `--set key=value`: a value is parsed by its field's type, an unknown key
names the closest valid ones, and the whole recipe is validated again.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import fields
from typing import Any, Literal

import yaml

from lorafit.errors import UserError
from lorafit.recipe.schema import Recipe


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=Recipe, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of the recipe and its declared type."""
    out: dict[str, Any] = {}
    hints = _hints(cls)
    for fl in fields(cls):
        tp = hints[fl.name]
        if dataclasses.is_dataclass(tp):
            out.update(all_keys(tp, f"{prefix}{fl.name}."))
        else:
            out[f"{prefix}{fl.name}"] = tp
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list of " + _type_name(typing.get_args(tp)[0]) + "s (comma-separated)"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(key: str, tp, value: Any) -> Any:
    """Convert `value` (a command-line string, or a YAML/Python value) to the declared type `tp`, or say why not."""
    origin = typing.get_origin(tp)
    bad = UserError(f"recipe key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in {"none", "null"})):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, a, value)
            except UserError:
                continue
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise bad
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):  # JSON, or YAML's flow list `[q_proj, v_proj]` that shells leave unquoted
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise bad from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise bad
        try:
            return [coerce(key, item, v) for v in value]
        except UserError:
            raise bad from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp is int or tp is float:
        # a bool is an int to Python, not a number to a user; an int field takes no fraction, a float field any number
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported recipe field type {tp!r} for {key}")  # a bug in the recipe schema


def unknown_key(key: str) -> UserError:
    keys = list(all_keys())
    leaf = key.rsplit(".", 1)[-1].lower()

    def leaf_of(k: str) -> str:
        return k.rsplit(".", 1)[-1]

    def initials(k: str) -> str:
        return "".join(w[0] for w in leaf_of(k).split("_") if w)

    # The same name in another section, an abbreviation (lr -> learning_rate), a part of the name (batch_size ->
    # per_device_batch_size), then spelling neighbours; keys of the section the user named come first.
    close = [k for k in keys if leaf_of(k) == leaf]
    close += [k for k in keys if k not in close and len(leaf) >= 2
              and (initials(k) == leaf or (len(leaf) >= 4 and leaf in leaf_of(k)))]
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.5) if k not in close]
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    close.sort(key=lambda k: not (section and k.startswith(section)))
    hint = f"; did you mean {', '.join(repr(c) for c in close[:3])}?" if close else ""
    return UserError(f"unknown recipe key '{key}'{hint} (--print-config lists every key)")


def _replace_path(obj, path: list[str], value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    child = getattr(obj, path[0])
    return dataclasses.replace(obj, **{path[0]: _replace_path(child, path[1:], value)})


def set_value(cfg: Recipe, key: str, value: Any) -> Recipe:
    """Return a copy of `cfg` with one dotted key set (type-checked) and everything re-validated."""
    keys = all_keys()
    if key not in keys:
        raise unknown_key(key)
    return _replace_path(cfg, key.split("."), coerce(key, keys[key], value))


def apply_overrides(cfg: Recipe, overrides: Iterable[str]) -> Recipe:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} must look like dotted.key=value, e.g. --set lora.r=16")
        cfg = set_value(cfg, key.strip(), value.strip())
    return cfg


# Keys of earlier lorafit versions that a saved recipe.yaml may hold: old name -> new name (None: dropped). A run
# folder written before a rename still loads in generate.py, merge.py and --resume.
RENAMED = {"eval.skill_prompts": "eval.metric_rows", "eval.skill_max_new_tokens": "eval.metric_max_new_tokens",
           "eval.skill_check": None}


def from_dict(data: dict, source: str) -> Recipe:
    """Build a recipe from nested plain values (a saved recipe.yaml), checking every key and type."""
    cfg = Recipe()

    def walk(d: dict, prefix: str):
        nonlocal cfg
        if not isinstance(d, dict):
            raise UserError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
        for k, v in d.items():
            dotted = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, dotted + ".")
            elif dotted in RENAMED:
                if RENAMED[dotted]:
                    cfg = set_value(cfg, RENAMED[dotted], v)
            else:
                cfg = set_value(cfg, dotted, v)

    walk(data, "")
    return cfg


def describe_fields(cls=Recipe, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) of every leaf, for docs/recipes.md (python -m lorafit.recipe_docs)."""
    rows = []
    hints = _hints(cls)
    default = cls()
    for fl in fields(cls):
        tp = hints[fl.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{fl.name}.")
        else:
            rows.append((f"{prefix}{fl.name}", _type_name(tp), getattr(default, fl.name), fl.metadata.get("doc", "")))
    return rows
