"""The recipe's schema: one dataclass per section, every field documented where it is declared (`doc=`, from which
docs/recipes.md is generated) and checked in the section's __post_init__; `Recipe.validate` checks the rules between
sections once every override is applied.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import yaml

from lorafit.errors import UserError


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


def _finite(section: Any, name: str) -> None:
    """Refuse NaN and infinity in every float field of a section, before its range checks: inf passes `> 0` and
    `learning_rate=inf` trained to an all-NaN adapter that was reported finished; nan fails every comparison, so a
    range check would name the wrong problem."""
    for fl in fields(section):
        v = getattr(section, fl.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"recipe key '{name}.{fl.name}' = {v}: must be a finite number")


SEED_MAX = 2**32 - 1  # numpy's seed range, which HF's set_seed feeds
# the decoder linears of the supported families (Llama, Qwen2, Mistral), by the names PEFT targets
FP8_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        "data.padding_free; lorafit.attention).")
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
    fp8_matmuls: Literal["off", "input_grads", "all"] = f(
        "off", "With lora.fused on an FP8 GPU (compute capability 8.9+: Ada, Hopper): the frozen base's matmuls in "
        "FP8 e4m3 with row-wise scales, the NF4 weight dequantized straight to FP8 (lorafit.fp8): input_grads = the "
        "backward's input-gradient GEMM only (the loss of a step is computed as before), all = the forward's too "
        "(faster; the loss moves by ~0.6%, fp8_skip_forward_layers). LoRA stays in compute_dtype. docs/benchmarks.md: "
        "speed and parity."
    )
    fp8_skip_forward: list[str] = f(
        [], "With fp8_matmuls=all: linears (by name, e.g. down_proj) whose forward GEMM stays in compute_dtype in every "
        "layer; their input gradients still run in FP8."
    )
    fp8_skip_forward_layers: list[int] = f(
        [0, 1, -2, -1], "With fp8_matmuls=all: decoder layers (index; negative counts from the end) whose forward "
        "GEMMs stay in compute_dtype; their input gradients still run in FP8. The first two and last two by default: "
        "there an FP8 forward moves the loss ~8x as much per layer as in the middle (SmolLM2-135M, 50 steps: 1.19% "
        "with every forward in FP8, 0.55% with these four kept, 88% of a 7B's forward FLOPs still in FP8; "
        "docs/benchmarks.md). [] puts every layer's forward in FP8."
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
        _finite(self, "lora")
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
        "(the tokenizer's if it has one, else Llama-2's). Llama-2 text rows keep Llama-2's format unless this is "
        "tokenizer (the family recipes: guanaco's rows in each model's own chat format)."
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
    truncation_warning: float = f(
        0.05, "Warn, with the numbers and the data.max_length that would fit, when more than this share of rows is "
        "longer than data.max_length, or when any row's answer loses its end (its EOS: the model would not learn to "
        "stop).")
    allow_truncated_answers: bool = f(
        False, "Train even when every row's answer is cut by data.max_length (refused otherwise: nothing would teach "
        "the model to stop).")

    def __post_init__(self):
        _finite(self, "data")
        _check(0.0 <= self.truncation_warning <= 1.0, "data.truncation_warning", self.truncation_warning,
               "must be in [0, 1]")
        _check(bool(self.path.strip()), "data.path", self.path, "must name a dataset")
        _check(self.max_length >= 16, "data.max_length", self.max_length, "must be at least 16 tokens")
        _check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _check(self.max_rows is None or self.max_rows > 0, "data.max_rows", self.max_rows, "must be positive")
        _check(self.synthetic_rows > 0, "data.synthetic_rows", self.synthetic_rows, "must be positive")
        _check(self.eval_max_rows is None or self.eval_max_rows > 0, "data.eval_max_rows", self.eval_max_rows,
               "must be positive, or unset for no cap")
        _check(0 <= self.seed <= SEED_MAX, "data.seed", self.seed, f"must be in [0, {SEED_MAX}]")


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
        "per tensor (lorafit.optim).")
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
    cuda_graphs: bool | Literal["auto"] = f(
        False, "Replay each decoder layer's forward and backward as CUDA graphs on steps padded to a fixed shape "
        "(GPU, one process, packed varlen batches, one micro-batch per step, no recompute; lorafit.graphs). Takes the "
        "kernel launches off the host. true = on, or a note saying why not; auto = on where those hold, else "
        "silently off.")
    activation_offloading: bool = f(
        False, "Keep the activations saved for backward in CPU memory, copied on side streams (TRL's); with "
        "gradient checkpointing only each layer's input goes. Trades PCIe traffic for GPU memory; GPU only."
    )

    def __post_init__(self):
        _finite(self, "training")
        _check(self.epochs > 0, "training.epochs", self.epochs, "must be positive")
        _check(self.max_steps == -1 or self.max_steps > 0, "training.max_steps", self.max_steps,
               "must be -1 (use epochs) or a positive number of steps")
        _check(self.per_device_batch_size > 0, "training.per_device_batch_size", self.per_device_batch_size,
               "must be positive")
        _check(self.gradient_accumulation_steps > 0, "training.gradient_accumulation_steps",
               self.gradient_accumulation_steps, "must be positive")
        # An upper bound too: 1e39 is a finite Python float that torch's AdamW cannot convert to float32 (a traceback
        # mid-run), and no LoRA run trains above a few percent (the recipes use 2e-4).
        _check(0 < self.learning_rate <= 1.0, "training.learning_rate", self.learning_rate,
               "must be in (0, 1] (the recipes use 2e-4)")
        _check(0 <= self.warmup_ratio < 1, "training.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _check(self.max_grad_norm >= 0, "training.max_grad_norm", self.max_grad_norm, "must be >= 0 (0 disables)")
        _check(self.weight_decay >= 0, "training.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 <= self.seed <= SEED_MAX, "training.seed", self.seed, f"must be in [0, {SEED_MAX}]")
        _check(self.dataloader_num_workers >= 0, "training.dataloader_num_workers", self.dataloader_num_workers,
               "must be >= 0 (0 loads batches in the training process)")
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
    metric: Literal["auto", "none", "exact", "contains", "regex"] = f(
        "auto", "Score greedy answers to held-out prompts against their reference answers, before training and after: "
        "exact (equal, ignoring white space and case), contains (the reference appears in the answer), regex "
        "(eval.regex finds the same answer in both), none; auto = exact for synthetic:<task> data, else none. "
        "eval/<metric> in TensorBoard, <metric>_before / _after in summary.json, every answer in "
        "RUN/eval/predictions-*.jsonl (lorafit.metrics).")
    regex: str | None = f(None, "For metric=regex: the pattern that finds the answer (its first group, or the whole "
                          "match), e.g. '####\\s*(-?\\d+)'.")
    metric_rows: int = f(50, "Held-out prompts the metric scores (the first ones of the seeded held-out split).")
    metric_max_new_tokens: int = f(32, "Longest scored answer, in tokens (generation stops at EOS).")
    metric_at_eval_steps: bool = f(False, "Also score at every evaluation during training, not only before and after.")
    batch_size: int = f(16, "Prompts generated together (greedy, left-padded).")

    def __post_init__(self):
        _check(self.samples >= 0, "eval.samples", self.samples, "must be >= 0")
        for key in ("max_new_tokens", "metric_rows", "metric_max_new_tokens", "batch_size"):
            _check(getattr(self, key) > 0, f"eval.{key}", getattr(self, key), "must be positive")
        if self.regex:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise UserError(f"recipe key 'eval.regex' = {self.regex!r}: not a regular expression ({e})") from None
        _check(all(p.strip() for p in self.prompts), "eval.prompts", self.prompts, "must not hold empty prompts")


@dataclass
class OutputConfig:
    dir: str = f("runs/run", "Run folder: adapter, tokenizer, recipe.yaml, summary.json, log.txt, tb/, checkpoints/. "
                 "A folder of its own: not the current folder, nor inside the model's or the data's folder.")

    def __post_init__(self):
        _check(bool(self.dir.strip()), "output.dir", self.dir,
               "must name a run folder (an empty value, e.g. an unset shell variable, would mean the current folder)")


@dataclass
class CheckpointConfig:
    every_steps: int = f(100, "Save a checkpoint every N optimizer steps (0: not by steps).")
    every_minutes: float = f(30.0, "Also save when this many minutes have passed since the last save (0: not by time).")
    keep_last: int = f(2, "Keep the newest K committed checkpoints under <output.dir>/checkpoints (0: keep all).")
    max_consecutive_skips: int = f(
        5, "Stop the run after this many consecutive steps with a non-finite loss or gradient (each is skipped).")

    def __post_init__(self):
        _finite(self, "checkpoint")
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
    eval: EvalConfig = f(EvalConfig, "Evaluation: sample answers and the held-out metric.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> Recipe:
        """The rules between fields of different sections, checked once every override is applied (a field at a
        time they could refuse a half-set combination); the launch's rules are lorafit.layout's."""
        q, lora, data, t = self.quantization, self.lora, self.data, self.training
        if self.model.attn_implementation == "varlen" and not (data.packing or data.padding_free):
            raise UserError("model.attn_implementation=varlen runs on padding-free batches; set data.packing=true "
                            "(rows packed into full sequences) or data.padding_free=true (the same rows per step), or "
                            "use sdpa")
        if q.keep_dequantized and not lora.fused:
            raise UserError("quantization.keep_dequantized=true needs lora.fused=true (the fused layers keep the "
                            "weights); set both, or neither")
        if q.keep_dequantized and (t.gradient_checkpointing is True or t.activation_offloading):
            raise UserError("quantization.keep_dequantized=true keeps 16-bit weights as activations, which gradient "
                            "checkpointing would recompute and activation offloading would copy to the host; set it "
                            "to false, or turn both off")
        if q.fp8_matmuls != "off":
            if not lora.fused or not q.load_in_4bit or q.quant_type != "nf4":
                raise UserError(f"quantization.fp8_matmuls={q.fp8_matmuls} runs the fused NF4 layers' matmuls in "
                                "FP8; set lora.fused=true with load_in_4bit=true and quant_type=nf4, or "
                                "fp8_matmuls=off")
            unknown = [n for n in q.fp8_skip_forward if n not in FP8_LINEAR_NAMES]
            if unknown:
                raise UserError(f"quantization.fp8_skip_forward: '{unknown[0]}' is not a decoder linear; name some "
                                f"of {', '.join(FP8_LINEAR_NAMES)}, or [] for none")
            if q.keep_dequantized:
                raise UserError(f"quantization.fp8_matmuls={q.fp8_matmuls} dequantizes straight to FP8 in each "
                                "pass, keep_dequantized=true keeps 16-bit weights instead; set fp8_matmuls=off or "
                                "keep_dequantized=false")
        if self.eval.metric == "regex" and not self.eval.regex:
            raise UserError("eval.metric=regex needs eval.regex, the pattern that finds the answer (its first group), "
                            "e.g. --set 'eval.regex=####\\s*(-?\\d+)'")
        if q.dequant_kernel == "triton":
            if not lora.fused:
                raise UserError("quantization.dequant_kernel=triton is the fused layers' kernel; set lora.fused=true, "
                                "or dequant_kernel=bitsandbytes")
            if q.quant_type != "nf4" or q.double_quant:
                raise UserError("quantization.dequant_kernel=triton dequantizes plain NF4 (quant_type=nf4, "
                                "double_quant=false); set those, or dequant_kernel=bitsandbytes")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
