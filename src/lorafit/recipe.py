"""Recipes: typed, validated run configurations, their loading and their command-line overrides.

A recipe is a Python module in `recipes/` (or any file path) with a function `recipe() -> Recipe`. A variant calls
its base and changes a few fields (see `recipes/quickstart.py`). On the command line `--set dotted.key=value`
overrides one field; the value is parsed by the field's declared type and the whole recipe is validated again, all
before any model or data is loaded. Every field is documented where it is declared (`doc=`); `--print-config`
shows the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from lorafit.errors import UserError

_HERE = Path(__file__).resolve()
# recipes/ sits at the repository root (editable install, src layout); LORAFIT_RECIPES or ./recipes take precedence.
RECIPE_DIRS = [Path(p) for p in os.environ.get("LORAFIT_RECIPES", "").split(os.pathsep) if p] + [
    Path.cwd() / "recipes",
    _HERE.parents[2] / "recipes",
]


def f(default: Any, doc: str, **kw):
    """A dataclass field carrying its documentation (docs/recipes.md is generated from it: lorafit.recipe_docs)."""
    if dataclasses.is_dataclass(default) and isinstance(default, type):  # a section: each recipe gets its own
        return field(default_factory=default, metadata={"doc": doc}, **kw)
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


def _check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise UserError(f"recipe key '{key}' = {value!r}: {what}")


DType = Literal["bfloat16", "float16", "float32"]


@dataclass
class ModelConfig:
    name: str = f("NousResearch/Llama-2-7b-chat-hf", "Base model: a hub id or a local folder (or GGUF folder).")
    gguf_file: str | None = f(
        None, "GGUF file inside `name` to load with transformers' gguf_file=; converted once to a cached checkpoint."
    )
    tokenizer: str | None = f(None, "Tokenizer hub id or folder; defaults to `name`.")
    revision: str | None = f(None, "Hub revision (branch, tag or commit) of the model and tokenizer.")
    attn_implementation: str = f(
        "sdpa", "Attention kernel: sdpa, eager, flex_attention, flash_attention_2 (needs the flash-attn package), or "
        "varlen: PyTorch's own variable-length flash kernel over padding-free batches (needs data.packing or "
        "data.padding_free; lorafit.fastpath).")
    sdpa_cudnn: bool = f(
        False, "Let sdpa use PyTorch's cuDNN attention kernel. Off by default: cuDNN builds a plan for every new batch "
        "shape (~1 s each on an H100), which padded batches of varying length pay again and again.")
    pad_token: str | None = f(
        None, "Pad token; by default an existing special token distinct from EOS (Llama-2: <unk>) so EOS is learned."
    )
    trust_remote_code: bool = f(False, "Allow model code from the hub (only for models you trust).")

    def __post_init__(self):
        _check(bool(self.name.strip()), "model.name", self.name, "must name a hub id or a local folder")
        allowed = {"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "varlen"}
        _check(self.attn_implementation in allowed, "model.attn_implementation", self.attn_implementation,
               f"must be one of {sorted(allowed)}")


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = f(True, "Quantize the frozen base to 4 bits with bitsandbytes (QLoRA); false = 16-bit LoRA.")
    quant_type: Literal["nf4", "fp4"] = f("nf4", "4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4.")
    double_quant: bool = f(False, "Nested quantization of the quantization constants (saves ~0.4 bit/param).")
    compute_dtype: DType = f("bfloat16", "Dtype of the 4-bit matmuls and of LoRA weights: bfloat16 or float16.")
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = f(
        "auto", "Storage dtype of packed 4-bit weights; auto lets the layout decide (ZeRO-3 needs the compute dtype)."
    )
    keep_dequantized: bool = f(
        False, "With lora.fused: keep each 4-bit layer's 16-bit weight from the forward for the backward instead of "
        "dequantizing it twice (+2 bytes per base parameter of GPU memory; only without gradient checkpointing and "
        "activation offloading)."
    )
    dequant_kernel: Literal["bitsandbytes", "triton"] = f(
        "bitsandbytes", "With lora.fused on a GPU: the NF4 dequantize kernel, bitsandbytes' or lorafit's Triton "
        "kernel (lorafit.fused; nf4 without double_quant; the same values)."
    )


@dataclass
class LoraConfig:
    r: int = f(64, "LoRA rank.")
    alpha: int = f(16, "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = f(0.1, "Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = f("none", "Which biases train.")
    target_modules: list[str] | None = f(
        None, "Modules that get adapters; unset = PEFT's default for the architecture (q_proj,v_proj for Llama); "
        "'all-linear' = every linear layer but the output head."
    )
    fused: bool = f(
        False, "Run each 4-bit linear and its adapter as one autograd function (lorafit.fused): dequantize, base "
        "matmul, dropout and the LoRA matmuls, with the scale and the add inside the GEMM; PEFT's layers otherwise."
    )

    def __post_init__(self):
        _check(self.r > 0, "lora.r", self.r, "must be a positive integer")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be a positive integer")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(self.target_modules is None or len(self.target_modules) > 0, "lora.target_modules",
               self.target_modules, "must list at least one module name, or be unset for PEFT's default")


@dataclass
class DataConfig:
    path: str = f(
        "mlabonne/guanaco-llama2-1k",
        "Dataset: a hub id, a parquet/jsonl/json/csv file, a folder of them, a `datasets` saved folder, or "
        "'synthetic:<task>' for lorafit's built-in generated data.",
    )
    split: str = f("train", "Split to read: of a hub id, a saved DatasetDict, or a folder whose file names name "
                   "splits as on the hub (data/train-00000-of-00001.parquet, test.jsonl).")
    format: Literal["auto", "llama2", "alpaca", "messages"] = f(
        "auto", "Row format: llama2 (pre-rendered <s>[INST] ... [/INST] ... </s> text), alpaca "
        "(instruction/input/output), messages (chat list of {role, content}); auto detects it from the columns."
    )
    text_column: str = f("text", "Column holding pre-rendered Llama-2 chat text (format llama2).")
    messages_column: str = f("messages", "Column holding the chat messages (format messages).")
    chat_template: Literal["auto", "llama2", "tokenizer"] = f(
        "auto", "How alpaca/messages rows are rendered: the tokenizer's chat template, Llama-2's, or auto "
        "(the tokenizer's if it has one, else Llama-2's). Llama-2 text rows are always kept in Llama-2 format."
    )
    system_prompt: str | None = f(None, "System prompt added to rows that have none (unset: none).")
    max_length: int = f(1024, "Sequences longer than this are truncated (and counted).")
    completion_only: bool = f(True, "Only answer tokens carry loss; prompts are masked.")
    eval_fraction: float = f(0.0, "Fraction of rows held out for evaluation (deterministic split).")
    eval_max_rows: int | None = f(None, "Cap on held-out rows (unset: no cap).")
    bad_rows: Literal["fail", "skip"] = f("fail", "A malformed row stops the run (fail) or is skipped and counted.")
    packing: bool = f(False, "Pack several rows into one sequence (no attention across rows).")
    padding_free: bool = f(
        False, "Concatenate each micro-batch's rows into one sequence instead of padding them (no attention across "
        "rows): the same rows per step as padded batches, without the pad compute. Packing implies it."
    )
    cache: bool = f(
        True, "Keep the tokenized rows of local files and synthetic data under LORAFIT_CACHE (~/.cache/lorafit), keyed "
        "by this section, the tokenizer, the files' sizes and times and lorafit's formatting code; a later run with "
        "the same key loads them instead of tokenizing again. Hub datasets are tokenized every run.")
    max_rows: int | None = f(None, "Read at most this many rows (unset: all).")
    synthetic_rows: int = f(2000, "Rows generated for 'synthetic:<task>' data.")
    seed: int = f(42, "Seed of the eval split and of synthetic data.")

    def __post_init__(self):
        _check(bool(self.path.strip()), "data.path", self.path, "must name a dataset")
        _check(self.max_length >= 16, "data.max_length", self.max_length, "must be at least 16 tokens")
        _check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _check(self.max_rows is None or self.max_rows > 0, "data.max_rows", self.max_rows, "must be positive")
        _check(self.synthetic_rows > 0, "data.synthetic_rows", self.synthetic_rows, "must be positive")


@dataclass
class TrainingConfig:
    epochs: float = f(1.0, "Passes over the training rows (ignored when max_steps > 0).")
    max_steps: int = f(-1, "Stop after this many optimizer steps (-1: run `epochs`).")
    per_device_batch_size: int = f(4, "Rows per micro-batch on each device.")
    gradient_accumulation_steps: int = f(1, "Micro-batches per optimizer step.")
    learning_rate: float = f(2e-4, "Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = f("cosine", "Schedule shape.")
    warmup_ratio: float = f(0.03, "Fraction of steps spent warming up linearly.")
    max_grad_norm: float = f(0.3, "Gradient clipping norm (0 disables).")
    weight_decay: float = f(0.001, "Decoupled weight decay.")
    optimizer: str = f(
        "paged_adamw_32bit", "A transformers optimizer name (paged_adamw_32bit, adamw_torch, ...), or "
        "lorafit_adamw_32bit: paged_adamw_32bit's kernel and float32 state, unpaged and without a host-device sync "
        "per tensor (lorafit.fastpath).")
    gradient_checkpointing: bool | Literal["auto"] = f(
        True, "Recompute activations in backward to save memory; auto = the memory planner (lorafit.plan, --plan) "
        "turns it on only when the run would not fit in the GPU without it."
    )
    device: Literal["auto", "cpu", "cuda"] = f("auto", "auto = CUDA when available, else CPU.")
    seed: int = f(42, "Seed of initialisation, dropout and data order.")
    eval_steps: int | None = f(None, "Evaluate every N steps (needs data.eval_fraction > 0; unset: only at the end).")
    dataloader_num_workers: int = f(0, "Worker processes feeding batches.")
    liger_kernels: bool = f(False, "Liger's fused Triton kernels for RMSNorm, SwiGLU and RoPE (GPU; the loss keeps "
                            "TRL's chunked LM head or lorafit's indexed one).")
    torch_compile: bool = f(False, "torch.compile the model's forward (GPU; pays off on long runs).")
    activation_offloading: bool = f(
        False, "Keep the activations saved for backward in CPU memory, copied on side streams (TRL's); with "
        "gradient checkpointing only each layer's input goes. Trades PCIe traffic for GPU memory; GPU only."
    )

    def __post_init__(self):
        _check(self.epochs > 0, "training.epochs", self.epochs, "must be positive")
        _check(self.max_steps == -1 or self.max_steps > 0, "training.max_steps", self.max_steps,
               "must be -1 (use epochs) or a positive number of steps")
        _check(self.per_device_batch_size > 0, "training.per_device_batch_size", self.per_device_batch_size,
               "must be positive")
        _check(self.gradient_accumulation_steps > 0, "training.gradient_accumulation_steps",
               self.gradient_accumulation_steps, "must be positive")
        _check(self.learning_rate > 0, "training.learning_rate", self.learning_rate, "must be positive")
        _check(0 <= self.warmup_ratio < 1, "training.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _check(self.max_grad_norm >= 0, "training.max_grad_norm", self.max_grad_norm, "must be >= 0")
        _check(self.eval_steps is None or self.eval_steps > 0, "training.eval_steps", self.eval_steps,
               "must be positive")


@dataclass
class LoggingConfig:
    tensorboard: bool = f(True, "Write TensorBoard events under <output.dir>/tb (rank 0 only).")
    steps: int = f(1, "Log metrics every N optimizer steps.")
    progress_bar: bool = f(True, "Show a progress bar when the console is a terminal (one line per logging step "
                           "otherwise, or when false); rank 0 only.")
    token_metrics: bool = f(
        False, "Log TRL's per-step entropy and token accuracy; costs ~5 host-device syncs per micro-step on a GPU."
    )

    def __post_init__(self):
        _check(self.steps > 0, "logging.steps", self.steps, "must be positive")


@dataclass
class EvalConfig:
    on_start: bool = f(True, "Also evaluate before the first step (needs data.eval_fraction > 0): the base model's "
                       "eval loss and sample answers are the baseline.")
    prompts: list[str] = f([], "Prompts answered greedily at each evaluation and logged as TensorBoard text; empty = "
                           "the first `samples` held-out prompts.")
    samples: int = f(3, "How many held-out prompts to answer when `prompts` is empty (0: no samples).")
    max_new_tokens: int = f(128, "Longest sample answer, in tokens.")
    skill_check: bool = f(True, "For synthetic:<task> data: exact-match accuracy on held-out prompts before and "
                          "after training (eval/skill_exact_match, summary skill_before/skill_after).")
    skill_prompts: int = f(50, "Held-out prompts scored by the skill check.")
    skill_max_new_tokens: int = f(16, "Longest skill-check answer, in tokens (a longer one is wrong anyway).")
    batch_size: int = f(16, "Prompts generated together (greedy, left-padded).")

    def __post_init__(self):
        _check(self.samples >= 0, "eval.samples", self.samples, "must be >= 0")
        for key in ("max_new_tokens", "skill_prompts", "skill_max_new_tokens", "batch_size"):
            _check(getattr(self, key) > 0, f"eval.{key}", getattr(self, key), "must be positive")
        _check(all(p.strip() for p in self.prompts), "eval.prompts", self.prompts, "must not hold empty prompts")


@dataclass
class OutputConfig:
    dir: str = f("runs/run", "Run folder: adapter, tokenizer, recipe.yaml, summary.json, tb/.")


@dataclass
class CheckpointConfig:
    every_steps: int = f(100, "Save a checkpoint every N optimizer steps (0: not by steps).")
    every_minutes: float = f(30.0, "Also save when this many minutes have passed since the last save (0: not by time).")
    keep_last: int = f(2, "Keep the newest K committed checkpoints under <output.dir>/checkpoints (0: keep all).")
    max_consecutive_skips: int = f(
        5, "Stop the run after this many consecutive steps with a non-finite loss or gradient (each is skipped).")

    def __post_init__(self):
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "must be >= 0")
        _check(self.every_minutes >= 0, "checkpoint.every_minutes", self.every_minutes, "must be >= 0")
        _check(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "must be >= 0")
        _check(self.max_consecutive_skips > 0, "checkpoint.max_consecutive_skips", self.max_consecutive_skips,
               "must be positive")


@dataclass
class Recipe:
    name: str = f("custom", "Recipe name.")
    description: str = f("", "One line on what this recipe is for.")
    model: ModelConfig = f(ModelConfig, "Base model.")
    quantization: QuantizationConfig = f(QuantizationConfig, "4-bit quantization of the base.")
    lora: LoraConfig = f(LoraConfig, "LoRA adapters.")
    data: DataConfig = f(DataConfig, "Dataset and formatting.")
    training: TrainingConfig = f(TrainingConfig, "Optimization.")
    logging: LoggingConfig = f(LoggingConfig, "Console and TensorBoard.")
    output: OutputConfig = f(OutputConfig, "Where the run is written.")
    checkpoint: CheckpointConfig = f(CheckpointConfig, "Periodic checkpoints, retention and the non-finite step policy.")
    eval: EvalConfig = f(EvalConfig, "Evaluation: sample answers and the skill check.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)



# ----------------------------------------------------------------------------------------------------------------
# Keys, types and overrides


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
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
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
            else:
                cfg = set_value(cfg, dotted, v)

    walk(data, "")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Loading


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
    return apply_overrides(cfg, overrides)


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
