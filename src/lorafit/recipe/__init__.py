"""Recipes: typed, validated run configurations, their loading and their command-line overrides.

A recipe is a Python module in `recipes/` (or any file path) with a function `recipe() -> Recipe`. A variant calls
its base and changes a few fields (see `recipes/quickstart.py`). On the command line `--set dotted.key=value`
overrides one field; the value is parsed by the field's declared type and the whole recipe is validated again, all
before any model or data is loaded. Every field is documented where it is declared (`doc=`); `--print-config`
shows the result.
"""

from lorafit.recipe.keys import all_keys, apply_overrides, coerce, describe_fields, from_dict, set_value, unknown_key
from lorafit.recipe.loading import RECIPE_DIRS, available_recipes, describe_recipes, load_recipe
from lorafit.recipe.schema import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    QuantizationConfig,
    Recipe,
    TrainingConfig,
)
from lorafit.recipe.variants import fast_path, other_model

__all__ = ["RECIPE_DIRS", "CheckpointConfig", "DataConfig", "EvalConfig", "LoggingConfig", "LoraConfig", "ModelConfig",
           "OutputConfig", "QuantizationConfig", "Recipe", "TrainingConfig", "all_keys", "apply_overrides",
           "available_recipes", "coerce", "describe_fields", "describe_recipes", "fast_path", "from_dict", "load_recipe",
           "other_model", "set_value", "unknown_key"]
