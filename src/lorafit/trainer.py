"""Trainer assembly: TRL's SFTTrainer configured from the recipe and the layout, and LorafitTrainer, the one place
that overrides HF Trainer's methods.

TRL builds labels from our `completion_mask`, pads or packs, and runs HF Trainer's loop (optimizer, schedule,
accumulation, clipping, DDP/DeepSpeed through accelerate). What LorafitTrainer adds: real-token accounting without a
device sync per step, the training loss without TRL's per-step metric syncs, and the run folder's hooks (checkpoints
staged and committed by lorafit.run.session, the non-finite guard, exact logging across a resume).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from trl import SFTConfig, SFTTrainer

from lorafit import graphs, mfu, shard
from lorafit.data.collate import REAL_TOKENS_KEY, CountingCollator
from lorafit.errors import UserError
from lorafit.layout import Layout
from lorafit.lm_head import LABEL_INDEX_KEY, install_indexed_lm_head
from lorafit.optim import LORAFIT_OPTIMIZERS, repage_optimizer_state
from lorafit.recipe import Recipe

log = logging.getLogger("lorafit")


def build_args(cfg: Recipe, layout: Layout, run_dir: str, has_eval: bool) -> SFTConfig:
    """Training arguments. Built before the model loads: under ZeRO-3 this is what makes from_pretrained shard."""
    t = cfg.training
    on_gpu = layout.device != "cpu"
    if not on_gpu:
        # DeepSpeed picks its accelerator when first imported (transformers imports it while loading a model) and
        # prints a warning when it has to fall back to the CPU; told up front, it has nothing to say.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    eval_strategy = "steps" if (has_eval and t.eval_steps) else "no"
    optimizer = layout.optimizer or t.optimizer  # the layout's choice (FSDP2 takes torch's twin of bitsandbytes')
    check_optimizer(optimizer)
    return SFTConfig(
        output_dir=run_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        # lorafit's own optimizers reach HF as a class (build_trainer); the name here is then unused
        optim="adamw_torch" if optimizer in LORAFIT_OPTIMIZERS else optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=on_gpu and cfg.quantization.compute_dtype == "bfloat16",
        fp16=on_gpu and cfg.quantization.compute_dtype == "float16",
        use_cpu=not on_gpu,
        # Checkpointing is already enabled on the model by lorafit.model with the layout's mode. transformers 5.25
        # renamed the argument (the old name warns); 5.17, the GPU image's, knows only the old one.
        **{_CHECKPOINTING_ARG: False},
        ddp_find_unused_parameters=layout.ddp_find_unused_parameters,
        logging_steps=cfg.logging.steps,
        logging_first_step=True,
        # HF checks every micro-step's loss for NaN/inf in Python (a host-device sync); lorafit's own non-finite
        # policy checks once per optimizer step instead.
        logging_nan_inf_filter=False,
        report_to="none",
        disable_tqdm=True,  # lorafit.progress draws the console's one bar (train.py adds it as a callback)
        save_strategy="no",
        eval_strategy=eval_strategy,
        eval_on_start=has_eval and cfg.eval.on_start,  # the base model's eval loss: the baseline
        eval_steps=t.eval_steps if eval_strategy == "steps" else None,
        dataloader_num_workers=t.dataloader_num_workers,
        # Batches go to the GPU from pinned memory without a blocking copy: a blocking host-to-device copy waits for
        # the GPU to drain (one host-device sync per input tensor, at the start of every step).
        dataloader_pin_memory=on_gpu,
        accelerator_config={"non_blocking": on_gpu},
        use_liger_kernel=False,  # lorafit.model applies Liger's kernels itself (TRL deprecates this flag)
        torch_compile=t.torch_compile and on_gpu,
        # lorafit.data truncates rows to max_length itself (and counts them); TRL refuses a max_length it cannot
        # enforce, which is the case with padding-free batches that are not packed
        max_length=None if (cfg.data.padding_free and not cfg.data.packing) else cfg.data.max_length,
        padding_free=cfg.data.padding_free,
        activation_offloading=t.activation_offloading and on_gpu,
        packing=cfg.data.packing,
        packing_strategy="bfd",  # best-fit packing with position ids per row: no attention across row boundaries
        completion_only_loss=cfg.data.completion_only,
        dataset_num_proc=None,
    )


_CHECKPOINTING_ARG = next((f.name for f in dataclasses.fields(SFTConfig) if f.name == "activation_checkpointing"),
                          "gradient_checkpointing")


def check_optimizer(name: str) -> None:
    # Checked here rather than in recipe.py: the list lives in transformers, whose import costs seconds.
    import difflib

    from transformers.training_args import OptimizerNames

    valid = sorted([o.value for o in OptimizerNames] + list(LORAFIT_OPTIMIZERS))
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "e.g. paged_adamw_32bit, adamw_torch"
        raise UserError(f"training.optimizer={name!r} is not an optimizer transformers knows; {hint}")


class LorafitTrainer(SFTTrainer):
    """SFTTrainer that counts real tokens and reports tokens/s at each log; once a RunSession is attached
    (`session`), checkpoints go through it (staged, committed with a manifest), and the step guard sees every loss
    and gradient norm."""

    session = None  # lorafit.run.session.RunSession, set by RunSession.attach
    staging_dir: str | None = None  # where HF's checkpoint writer writes while the session saves

    def __init__(self, *a, flops_per_token: float = 0.0, peak_flops: float = 0.0, token_metrics: bool = False,
                 indexed_lm_head: bool = False, fsdp2_on_cpu: bool = False, **kw):
        self._fsdp2_on_cpu = fsdp2_on_cpu  # read by create_accelerator_and_postprocess, inside super().__init__
        super().__init__(*a, **kw)
        # after SFTTrainer's __init__, which installed TRL's fused LM head that this wraps
        self.indexed_lm_head = indexed_lm_head and not token_metrics and install_indexed_lm_head(
            self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model)
        self.data_collator = CountingCollator(self.data_collator, index_labels=self.indexed_lm_head)
        self.real_tokens_local = 0
        self._eval_tokens = 0
        self._tokens_at_start = 0  # real tokens of the steps before a resume (lorafit_state.json)
        self._loss_carry: float | None = None  # a resumed run's loss since its last log, added at its first step
        self._last_logged_carry: int | None = None
        self._tr_loss_ref = None  # HF's accumulated loss since the last log, as the last log call saw it
        self._last_log = None  # (time, tokens, step) at the previous training log; the clock starts at step 1
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.token_metrics = token_metrics
        self._flops_params: int | None = None
        self._trainable: list | None = None

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self._fsdp2_on_cpu:
            # accelerate (1.16, state.py) turns on FSDP only for GPU-like distributed types and treats a CPU run
            # as MULTI_CPU, wrapping the model in DDP, although FSDP2's fully_shard runs on CPU over gloo: the FSDP2
            # layout's CPU runs (its tests) get the FSDP plugin the launcher described instead.
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            if state.distributed_type == DistributedType.MULTI_CPU:
                state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
                state.distributed_type = DistributedType.FSDP
                self.is_fsdp_enabled = True

    def floating_point_ops(self, inputs) -> int:
        """HF's count (6 x input tokens x non-embedding parameters) with the parameter count taken once. HF recounts
        it on every micro-step by walking every module: 9 ms per step of a tiny 32-layer PEFT model on this project's
        CPU (cProfile), host time in which the GPU can run out of queued work. On an H100 the change was within the
        run-to-run spread (docs/benchmarks.md); it is kept because the count cannot change."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flops_params is None:
            self._flops_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._flops_params

    def _clip_grad_norm(self, model):
        """Clips over the trainable (LoRA) parameters only, listed once. HF passes model.parameters(), so each step
        walks the frozen 4-bit base too; only tensors with gradients count toward the norm, so the result is the same.
        DeepSpeed and FSDP clip inside their engines and keep HF's path."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                     DistributedType.MULTI_CPU):
            return super()._clip_grad_norm(model)
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

    def training_step(self, model, inputs, *a, **kw):
        if self._last_log is None:
            self._last_log = (time.perf_counter(), self._tokens_at_start, self.state.global_step)
        self.real_tokens_local += int(inputs.pop(REAL_TOKENS_KEY, 0))
        loss = super().training_step(model, inputs, *a, **kw)
        if self.session is not None:
            self.session.guard.note_loss(loss)
        if self._loss_carry is not None:
            # A resumed run's first micro-step: HF adds what this returns to its accumulated loss, which starts at 0;
            # the carried sum makes the first log after a resume the mean over the same steps as the uninterrupted
            # run's (0 + (x + carry) equals carry + x exactly; only the logged value changes, never the gradients).
            loss = loss + self._loss_carry
            self._globalstep_last_logged = self._last_logged_carry
            self._loss_carry = None
        return loss

    def restore_logging(self, saved: dict) -> None:
        """On a resume (RunSession.attach): the loss accumulated since the last log, the step of that log, and the
        real tokens seen, as lorafit_state.json kept them, so the logged curves continue the stopped run's."""
        if not saved:
            return
        if saved.get("last_logged_step") is not None:
            self._loss_carry = float(saved.get("loss_since_log", 0.0))
            self._last_logged_carry = int(saved["last_logged_step"])
        tokens = int(saved.get("tokens_seen", 0))
        self._tokens_at_start = tokens
        self.real_tokens_local = tokens if self.args.process_index == 0 else 0  # the sum over ranks is the total

    def logging_state(self) -> dict:
        """What restore_logging needs, for a checkpoint (every rank calls this: the token count is a collective).
        A log at this very step has just reset HF's accumulated loss (to 0, or NaN after a skipped step, which the
        uninterrupted run zeroes right after; see _maybe_log_save_evaluate): the carry is then 0."""
        tokens = self.real_tokens_total()  # collective
        if self._globalstep_last_logged == self.state.global_step or self._tr_loss_ref is None:
            since = 0.0
        else:
            since = float(self._tr_loss_ref.item())  # host-device sync, once per checkpoint
        return {"loss_since_log": since, "last_logged_step": self._globalstep_last_logged, "tokens_seen": tokens}

    def _get_grad_norm(self, model, grad_norm=None):
        gn = super()._get_grad_norm(model, grad_norm)
        if self.session is not None:
            self.session.guard.grad_norm = gn
        return gn

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # TRL keeps a quantized model's LoRA weights in bf16, but HF reloads them with PEFT's load_adapter, whose
        # autocast_adapter_dtype upcasts them to fp32: the resumed run would train at another precision than the
        # run it continues. Put every trainable tensor back into the dtype it had (bf16 -> fp32 -> bf16 is exact).
        target = self.model if model is None else model
        before = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        if shard.is_sharded(target):  # FSDP2: each rank loads its part of the adapter (lorafit.shard)
            return shard.load_adapter(target, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for n, p in target.named_parameters():
            if n in before and p.dtype != before[n]:
                p.data = p.data.to(before[n])

    def _save_optimizer_and_scheduler(self, output_dir):
        if not (self.is_fsdp_enabled and shard.is_sharded(self.model)):
            return super()._save_optimizer_and_scheduler(output_dir)
        # HF also saves accelerate's whole FSDP model state here (save_fsdp_model), the 4-bit base included (~4 GB
        # for a 7B) at every checkpoint; a resume loads only the adapter (save_model), so that write is skipped.
        import transformers.trainer as hf_trainer

        save_model, hf_trainer.save_fsdp_model = hf_trainer.save_fsdp_model, lambda *a, **kw: None
        try:
            return super()._save_optimizer_and_scheduler(output_dir)
        finally:
            hf_trainer.save_fsdp_model = save_model

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.optimizer is not None:
            repage_optimizer_state(self.optimizer)

    def _maybe_log_save_evaluate(self, tr_loss, *a, **kw):
        self._tr_loss_ref = tr_loss
        super()._maybe_log_save_evaluate(tr_loss, *a, **kw)
        if self.session is not None and self._globalstep_last_logged == self.state.global_step:
            # HF "resets" the accumulated loss with tr_loss -= tr_loss, which keeps a NaN for ever once its own
            # per-micro-step NaN filter is off (it is: a sync per micro-step, see build_args). Zeroing it after each
            # log (no sync) confines a skipped step's NaN to the log interval it happened in.
            tr_loss.zero_()

    def save_model(self, output_dir=None, _internal_call=False):
        if not (self.is_fsdp_enabled and shard.is_sharded(self.model)):
            return super().save_model(output_dir, _internal_call)
        # FSDP2: the adapter's tensors gathered whole (a collective), saved by rank 0 as one process would
        self._save(output_dir or self.args.output_dir, state_dict=shard.adapter_state(self.model))

    def _get_output_dir(self, trial):
        return self.staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        if self.session is None:
            return super()._save_checkpoint(model, trial)
        self.session.save(self, model, trial, super()._save_checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The training loss without TRL's per-micro-step metrics (entropy, token accuracy, token counts).

        TRL gathers and `.item()`s those every micro-step: ~5 host-device syncs that stall the kernel queue between
        forward and backward. Same loss as TRL's default path (mean NLL over answer tokens from its fused LM head);
        any other path (eval, custom loss, label smoothing, MoE aux loss, or logging.token_metrics) goes to TRL.
        With the indexed LM head (lorafit.lm_head) the head scores the positions the collator listed on the host,
        without TRL's device-side masking and its syncs."""
        label_idx = inputs.pop(LABEL_INDEX_KEY, None)
        lean = (self.model.training and not return_outputs and not self.token_metrics
                and self.compute_loss_func is None and self.label_smoother is None and not self.aux_loss_enabled
                and self.args.loss_type == "nll")
        if not lean:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        import torch

        inputs["use_cache"] = False
        if label_idx is not None:
            loss = model(**inputs, lorafit_label_index=label_idx, num_items_in_batch=num_items_in_batch).loss
        else:
            outputs = model(**inputs, fused_lm_head=True)
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; num_items counts every rank's
        return loss

    def prediction_step(self, model, inputs, *a, **kw):
        self._eval_tokens += int(inputs.pop(REAL_TOKENS_KEY, 0))  # this evaluation's real tokens, counted on the host
        inputs.pop(LABEL_INDEX_KEY, None)
        return super().prediction_step(model, inputs, *a, **kw)

    def real_tokens_total(self) -> int:
        return self._sum_over_ranks(self.real_tokens_local)

    def _sum_over_ranks(self, count: int) -> int:
        if self.args.world_size == 1:
            return count  # host-side already: no device tensor, no sync at each log
        import torch

        t = torch.tensor([count], dtype=torch.int64, device=self.args.device)
        # Collective: sums every rank's host-side count; runs only at logging steps and at the end.
        return int(self.accelerator.reduce(t, reduction="sum").item())  # host-device sync

    def log(self, logs, start_time=None):
        if "eval_loss" in logs:
            # TRL reports as eval_num_tokens the training tokens its own loss path counted (0 on lorafit's lean
            # path); an evaluation's figure is the real tokens it scored, summed over ranks (a collective: every rank
            # logs each evaluation).
            self._metrics["eval"]["num_tokens"] = [self._sum_over_ranks(self._eval_tokens)]
            self._eval_tokens = 0
        if self.session is not None and "loss" in logs:
            logs["skipped_steps"] = self.session.guard.skipped
        if "loss" in logs and self._last_log is not None:  # a training log: real tokens/s since the previous one
            now = time.perf_counter()
            total = self.real_tokens_total()
            t0, n0, s0 = self._last_log
            steps = self.state.global_step - s0
            if now > t0 and steps > 0:
                rate = (total - n0) / (now - t0)
                logs["tokens_per_second"] = round(rate, 2)
                logs["step_time"] = round((now - t0) / steps, 4)
                if self.flops_per_token and self.peak_flops:
                    # per GPU: the rate is summed over ranks
                    logs["mfu"] = round(rate * self.flops_per_token / (self.peak_flops * self.args.world_size), 4)
            logs["tokens_seen"] = total
            self._last_log = (now, total, self.state.global_step)
        super().log(logs, start_time)


def build_trainer(cfg: Recipe, layout: Layout, args: SFTConfig, model, tokenizer, prepared,
                  callbacks) -> LorafitTrainer:
    # The tokenizer saved with every checkpoint and the final adapter (and so with a merged export) carries the chat
    # template of the format this run trains on: plain apply_chat_template then renders the training prompt's ids.
    tokenizer.chat_template = prepared.renderer.chat_template
    total = model.get_nb_trainable_parameters()[1]
    extra = {}
    optimizer = layout.optimizer or cfg.training.optimizer
    if optimizer in LORAFIT_OPTIMIZERS:
        # HF builds it with its usual parameter groups (weight decay off for norms and biases) and schedule
        extra["optimizer_cls_and_kwargs"] = (LORAFIT_OPTIMIZERS[optimizer](), {
            "lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon})
    sft = LorafitTrainer(
        flops_per_token=mfu.flops_per_token(total, layout.gradient_checkpointing),
        peak_flops=mfu.peak_flops(),
        token_metrics=cfg.logging.token_metrics,
        indexed_lm_head=layout.indexed_lm_head,
        fsdp2_on_cpu=layout.kind == "fsdp2" and layout.device == "cpu",
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
        **extra,
    )
    # HF prints every log as a dict (PrinterCallback, with disable_tqdm) or draws an evaluation bar inside the
    # training bar (ProgressCallback); lorafit.progress, among `callbacks`, shows the console's progress instead.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    sft.remove_callback(PrinterCallback)
    sft.remove_callback(ProgressCallback)
    if layout.cuda_graphs:
        sft.graphs = graphs.attach(sft, cfg.training.per_device_batch_size, cfg.data.max_length, tokenizer.pad_token_id)
    if (args.deepspeed_plugin is not None) != sft.is_deepspeed_enabled:
        # transformers prepared the model for one engine and accelerate set up another (accelerate's CPU path drops
        # DeepSpeed: ZeRO-2 would silently run as DDP). lorafit.layout refuses the known causes; anything else is a bug.
        raise RuntimeError(f"the launch asked for DeepSpeed={args.deepspeed_plugin is not None} but accelerate set up "
                           f"{sft.accelerator.distributed_type}")
    return sft
