"""Finding and loading recipes: a name in recipes/, a .py file with `recipe() -> Recipe`, or a saved recipe.yaml."""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

import yaml

from lorafit.errors import UserError
from lorafit.recipe.keys import apply_overrides, from_dict
from lorafit.recipe.schema import Recipe

_HERE = Path(__file__).resolve()
# recipes/ sits at the repository root (editable install, src layout); LORAFIT_RECIPES or ./recipes take precedence.
RECIPE_DIRS = [Path(p) for p in os.environ.get("LORAFIT_RECIPES", "").split(os.pathsep) if p] + [
    Path.cwd() / "recipes",
    _HERE.parents[3] / "recipes",
]




def available_recipes() -> list[str]:
    names = set()
    for d in RECIPE_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.py") if not p.name.startswith("_"))
    return sorted(names)


def describe_recipes() -> str:
    """--list-recipes: each recipe's name and its one-line description, with the command that runs it."""
    rows = []
    for name in available_recipes():
        try:
            desc = load_recipe(name).description or "(no description)"
        except UserError as e:  # a recipe that does not validate is listed with the reason, not hidden
            desc = f"(does not load: {e})"
        rows.append((name, desc))
    width = max((len(n) for n, _ in rows), default=0)
    lines = [f"{n:<{width}}  {d}" for n, d in rows]
    return "\n".join(lines + ["", "run one with: accelerate launch src/train.py --recipe NAME (--print-config shows "
                                   "every field)"])


def _find(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in {".py", ".yaml", ".yml"} or os.sep in name_or_path:
        if not p.is_file():
            raise UserError(f"recipe file {name_or_path} does not exist")
        return p
    for d in RECIPE_DIRS:
        cand = d / f"{name_or_path}.py"
        if cand.is_file():
            return cand
    close = difflib.get_close_matches(name_or_path, available_recipes(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(available_recipes())}"
    raise UserError(f"unknown recipe '{name_or_path}'{hint}")


def load_recipe(name_or_path: str, overrides: Iterable[str] = ()) -> Recipe:
    """Load a recipe by name (recipes/<name>.py), by .py path or from a saved recipe.yaml, then apply overrides."""
    path = _find(name_or_path)
    if path.suffix in {".yaml", ".yml"}:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"recipe file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        cfg = from_dict(data, str(path))
    else:
        spec = importlib.util.spec_from_file_location(f"lorafit_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # a broken recipe module is a bug in that file: keep its traceback
        if not hasattr(module, "recipe"):
            raise UserError(f"recipe file {path} defines no function recipe() -> Recipe")
        cfg = module.recipe()
        if not isinstance(cfg, Recipe):
            raise UserError(f"recipe() in {path} returned {type(cfg).__name__}, not lorafit.recipe.Recipe")
        # Dataclasses do not check types: `epochs=1` would stay an int, print as `1` and come back from the saved
        # recipe.yaml as 1.0. Rebuilding from plain values checks and normalizes every field to its declared type.
        cfg = from_dict(cfg.to_dict(), str(path))
    return apply_overrides(cfg, overrides).validate()
