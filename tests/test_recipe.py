"""Recipes: every shipped recipe loads and validates, overrides parse by declared type and re-validate, saved
recipe.yaml files round-trip, and docs/recipes.md matches the field docs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lorafit import recipe_docs
from lorafit.errors import UserError
from lorafit.recipe import (
    Recipe,
    all_keys,
    apply_overrides,
    available_recipes,
    coerce,
    describe_fields,
    from_dict,
    load_recipe,
    set_value,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_recipes_are_found():
    assert {"llama2_guanaco", "quickstart"} <= set(available_recipes())


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_loads_and_validates(name):
    cfg = load_recipe(name)
    assert isinstance(cfg, Recipe) and cfg.name == name and cfg.description
    # Validation runs in each section's __post_init__: rebuilding every section from its values re-runs it.
    for fl in dataclasses.fields(cfg):
        section = getattr(cfg, fl.name)
        if dataclasses.is_dataclass(section):
            type(section)(**{f.name: getattr(section, f.name) for f in dataclasses.fields(section)})
    # Every value has its declared type (a recipe module could pass e.g. "16" for an int).
    keys = all_keys()
    flat = _flat(cfg.to_dict())
    for key, value in flat.items():
        coerced = coerce(key, keys[key], value)
        assert coerced == value and type(coerced) is type(value), key
    # And it round-trips through the recipe.yaml a run saves.
    assert from_dict(yaml.safe_load(cfg.to_yaml()), "x") == cfg


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_llama2_guanaco_is_the_seed_configuration():
    c = load_recipe("llama2_guanaco")
    assert c.model.name == "NousResearch/Llama-2-7b-chat-hf" and c.data.path == "mlabonne/guanaco-llama2-1k"
    assert (c.quantization.load_in_4bit, c.quantization.quant_type, c.quantization.double_quant) == (True, "nf4", False)
    assert c.quantization.compute_dtype == "bfloat16"
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.bias, c.lora.target_modules) == (64, 16, 0.1, "none", None)
    t = c.training
    assert (t.per_device_batch_size, t.gradient_accumulation_steps, t.learning_rate, t.epochs) == (4, 1, 2e-4, 1)
    assert (t.lr_scheduler, t.warmup_ratio, t.max_grad_norm, t.weight_decay) == ("cosine", 0.03, 0.3, 0.001)
    assert t.optimizer == "paged_adamw_32bit" and c.output.dir.startswith("runs/")


def test_every_field_is_documented():
    for key, _type, _default, doc in describe_fields():
        assert doc.strip(), f"recipe key {key} has no doc"


def test_docs_recipes_md_is_up_to_date():
    doc = REPO / "docs" / "recipes.md"
    assert doc.read_text() == recipe_docs.render(), (
        "docs/recipes.md is stale; regenerate it: python -m lorafit.recipe_docs > docs/recipes.md"
    )


# ------------------------------------------------------------------------------------------------------------------
# Override parsing


def over(*items: str) -> Recipe:
    return apply_overrides(load_recipe("llama2_guanaco"), items)


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("True", True), ("yes", True), ("on", True), ("1", True),
     ("false", False), ("no", False), ("off", False), ("0", False)],
)  # fmt: skip
def test_bool_values(text, expected):
    assert over(f"data.packing={text}").data.packing is expected


def test_numbers():
    c = over("lora.r=16", "training.learning_rate=2e-4", "training.epochs=3", "training.max_steps=-1",
             "lora.dropout=0.05", "training.max_grad_norm=0")  # fmt: skip
    assert c.lora.r == 16 and type(c.lora.r) is int
    assert c.training.learning_rate == 0.0002 and c.training.epochs == 3.0 and type(c.training.epochs) is float
    assert c.training.max_steps == -1 and c.lora.dropout == 0.05 and c.training.max_grad_norm == 0.0


def test_none_unsets_optional_fields():
    c = over("lora.target_modules=q_proj", "data.max_rows=5")
    assert c.data.max_rows == 5
    c = apply_overrides(c, ["lora.target_modules=none", "data.max_rows=None", "model.tokenizer=null"])
    assert c.lora.target_modules is None and c.data.max_rows is None and c.model.tokenizer is None


@pytest.mark.parametrize(
    "text", ["q_proj,v_proj", "q_proj, v_proj", '["q_proj", "v_proj"]', "[q_proj, v_proj]", " q_proj ,v_proj, "]
)
def test_lists(text):
    assert over(f"lora.target_modules={text}").lora.target_modules == ["q_proj", "v_proj"]


def test_literal_choices():
    assert over("data.format=alpaca").data.format == "alpaca"
    assert over("quantization.compute_dtype=float16").quantization.compute_dtype == "float16"
    with pytest.raises(UserError, match=r"'data.format' expects one of auto, llama2, alpaca, messages, got 'chatml'"):
        over("data.format=chatml")


def test_value_may_hold_equals_signs():
    assert over("model.name=/models/a=b").model.name == "/models/a=b"


@pytest.mark.parametrize(
    "item, message",
    [
        ("lora.r=sixteen", r"recipe key 'lora.r' expects int, got 'sixteen'"),
        ("lora.r=1.5", r"recipe key 'lora.r' expects int, got '1.5'"),
        ("training.learning_rate=fast", r"'training.learning_rate' expects float, got 'fast'"),
        ("data.packing=maybe", r"'data.packing' expects bool, got 'maybe'"),
        ("data.max_rows=many", r"'data.max_rows' expects int or none, got 'many'"),
        ("lora.target_modules=[q_proj", r"'lora.target_modules' expects a list of strs .* got '\[q_proj'"),
        ("lora.target_modules=[1, 2]", r"'lora.target_modules' expects a list of strs .* got '\[1, 2\]'"),
        ("model.name= ", r"'model.name' = '': must name a hub id or a local folder"),
    ],
)
def test_wrong_types_name_the_key(item, message):
    with pytest.raises(UserError, match=message):
        over(item)


@pytest.mark.parametrize(
    "item, message",
    [
        ("lora.r=0", r"recipe key 'lora.r' = 0: must be a positive integer"),
        ("lora.dropout=1", r"recipe key 'lora.dropout' = 1.0: must be in \[0, 1\)"),
        ("data.eval_fraction=1.5", r"recipe key 'data.eval_fraction' = 1.5: must be in \[0, 1\)"),
        ("training.max_steps=0", r"'training.max_steps' = 0: must be -1"),
        ("lora.target_modules=", r"'lora.target_modules' = \[\]: must list at least one module"),
    ],
)
def test_overrides_are_validated_again(item, message):
    with pytest.raises(UserError, match=message):
        over(item)


@pytest.mark.parametrize(
    "key, closest",
    [("lora.rank", "lora.r"), ("training.lr", "training.learning_rate"), ("data.maxlength", "data.max_length"),
     ("max_steps", "training.max_steps"), ("model.nam", "model.name"),
     ("training.batch_size", "training.per_device_batch_size"), ("lora.target", "lora.target_modules")],
)  # fmt: skip
def test_unknown_key_names_the_closest(key, closest):
    with pytest.raises(UserError, match=rf"unknown recipe key '{key}'; did you mean .*'{closest}'"):
        over(f"{key}=1")


def test_an_override_without_equals_sign():
    with pytest.raises(UserError, match=r"override 'lora.r' must look like dotted.key=value"):
        over("lora.r")


def test_set_value_leaves_the_original_untouched():
    base = load_recipe("llama2_guanaco")
    changed = set_value(base, "lora.r", "8")
    assert base.lora.r == 64 and changed.lora.r == 8 and changed.lora is not base.lora


# ------------------------------------------------------------------------------------------------------------------
# Loading


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(UserError, match="unknown recipe 'llama2_guanco'; did you mean llama2_guanaco"):
        load_recipe("llama2_guanco")


def test_recipe_by_path_and_saved_yaml(tmp_path):
    cfg = load_recipe(str(REPO / "recipes" / "quickstart.py"), ["lora.r=4"])
    assert cfg.name == "quickstart" and cfg.lora.r == 4
    saved = tmp_path / "recipe.yaml"
    saved.write_text(cfg.to_yaml())
    again = load_recipe(str(saved), ["training.max_steps=7"])
    assert again == dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, max_steps=7))


def test_recipe_values_get_their_declared_types(tmp_path):
    py = tmp_path / "r.py"
    py.write_text(
        "from lorafit.recipe import Recipe, TrainingConfig\n\n"
        "def recipe():\n    return Recipe(name='r', training=TrainingConfig(epochs=2))\n"
    )
    cfg = load_recipe(str(py))
    assert type(cfg.training.epochs) is float and "epochs: 2.0" in cfg.to_yaml()
    py.write_text(
        "from lorafit.recipe import LoraConfig, Recipe\n\ndef recipe():\n    return Recipe(lora=LoraConfig(r=8.5))\n"
    )
    with pytest.raises(UserError, match="recipe key 'lora.r' expects int, got 8.5"):
        load_recipe(str(py))


def test_bad_recipe_files(tmp_path):
    with pytest.raises(UserError, match="recipe file .*missing.yaml does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora: {r: [\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_recipe(str(bad))
    bad.write_text("lora:\n  rank: 8\n")
    with pytest.raises(UserError, match="unknown recipe key 'lora.rank'"):
        load_recipe(str(bad))
    bad.write_text("lora: 8\n")
    with pytest.raises(UserError, match="unknown recipe key 'lora'"):
        load_recipe(str(bad))
    py = tmp_path / "r.py"
    py.write_text("def not_recipe():\n    pass\n")
    with pytest.raises(UserError, match=r"defines no function recipe\(\)"):
        load_recipe(str(py))
    py.write_text("def recipe():\n    return {'lora': {'r': 8}}\n")
    with pytest.raises(UserError, match="returned dict, not lorafit.recipe.Recipe"):
        load_recipe(str(py))
