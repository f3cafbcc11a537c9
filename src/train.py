"""Fine-tune a causal language model with QLoRA (4-bit NF4 base + LoRA adapters) from a recipe.

    accelerate launch src/train.py                                   # quickstart: offline, CPU, a few minutes
    accelerate launch src/train.py --recipe llama2_guanaco           # the seed fine-tune on one GPU
    accelerate launch --config_file launch/zero3.yaml src/train.py --recipe llama2_guanaco   # several GPUs
    accelerate launch src/train.py --recipe llama2_guanaco \\
        --set model.name=/models/llama-2-7b-chat --set data.path=/data/guanaco-llama2-1k --set training.max_steps=30
    python src/train.py --recipe llama2_guanaco --print-config       # resolved recipe + layout, loads nothing
    tensorboard --logdir runs                                        # watch

Data flows one way: recipe -> layout -> data/model -> trainer -> run dir. Each step lives in src/lorafit/.
"""

import sys

from lorafit import cli, hub, recipe
from lorafit.console import log


def train(args, holder) -> int:
    clock = cli.Stopwatch()
    cfg = recipe.load_recipe(args.recipe, args.overrides)
    hub.decide_offline(cfg)  # before any Hugging Face library is imported: no retry loop without a network
    from lorafit import layout, plan  # torch, and transformers' config reader for --plan; nothing more

    lay = layout.decide(cfg)
    if args.print_config:
        print(cfg.to_yaml() + "# " + lay.describe())
        return 0
    if args.plan:
        print(plan.describe(cfg, plan.shape_of(cfg.model), plan.smallest_gpu_gib(), lay))
        return 0
    # The rest of the libraries (transformers' models, peft, TRL, bitsandbytes) load here, after lorafit's logging
    # (cli.main) and the offline decision above, both of which they read at import.
    from lorafit import checkpoint, console, evaluate, model, progress, tb, trainer
    from lorafit.dist import main_first, prepare_data

    console.adopt_library_loggers()
    clock.lap("start-up")  # interpreter and imports
    model.check_source(cfg.model)  # a missing model path fails here, before anything is written
    run_dir = cli.RunDir(cfg.output.dir)
    holder.append(run_dir)
    args_hf = trainer.build_args(cfg, lay, str(run_dir.path), has_eval=cfg.data.eval_fraction > 0)  # before the model (ZeRO-3)
    is_local_main = args_hf.local_process_index == 0
    run = checkpoint.RunSession(run_dir, cfg, lay, args.resume)  # lock, signals, verified resume point (collective)
    if run.finished:
        return 0

    def inputs():
        source = model.materialize(cfg.model, is_local_main)
        tok = model.load_tokenizer(cfg, source)
        return source, tok, prepare_data(cfg.data, tok, is_local_main)  # tokenized once per machine

    source, tok, prepared = main_first(inputs, is_local_main)
    clock.lap("data")
    log.info("%s", lay.describe())
    log.info("%s", prepared.stats.summary_line())
    net = model.load_model(cfg, lay, source, tok)
    clock.lap("model")

    out = run_dir.create()
    if lay.is_main:
        (out / "recipe.yaml").write_text(cfg.to_yaml())
    writer = tb.RankZeroWriter(str(out / "tb") if cfg.logging.tensorboard else None, lay.is_main, run.purge_step)
    evals = evaluate.EvalCallback(cfg, lay, prepared.renderer, tok, prepared.eval_conversations, writer)
    shown = progress.TrainProgress(lay.is_main, cfg.logging.progress_bar, prepared.stats.eval_rows)
    callbacks = [tb.TensorBoardLogger(writer, cfg.to_yaml()), shown, evals]  # the eval line before its sample
    sft = trainer.build_trainer(cfg, lay, args_hf, net, tok, prepared, callbacks)
    console.adopt_library_loggers()  # DeepSpeed, when the launch uses it, is imported by now
    run.attach(sft)  # refuses a checkpoint saved for another model or LoRA shape
    clock.lap("trainer")
    sft.train(resume_from_checkpoint=run.resume_path)
    if (code := run.stopped_exit_code()) is not None:  # a signal (75) or too many non-finite steps (3)
        writer.close()
        return code
    if prepared.eval is not None and not evaluate.evaluated_at(sft.state, sft.state.global_step):
        sft.evaluate()
    wall = clock.lap("train")  # training and the final evaluation: summary.json's wall_time_s
    sft.save_model(str(out))  # adapter_model.safetensors + adapter_config.json (gathers shards under ZeRO-3)
    if lay.is_main:
        tok.save_pretrained(out)
    clock.lap("save")
    summary = trainer.write_summary(out, cfg, lay, sft, prepared, wall, net.get_nb_trainable_parameters()[0],
                                    extra={**evals.summary(), **run.summary_extra(sft), "phases_s": clock.laps})
    run.finish(summary)
    log.info("done: %d steps, final loss %s, %s real tokens/s; adapter in %s", summary["steps"],
                 f"{summary['final_loss']:.4g}" if summary["final_loss"] is not None else "n/a",
                 f"{summary['tokens_per_second']:,.0f}" if summary["tokens_per_second"] else "n/a", out)
    log.info("time: %s", clock.describe())
    writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(train, description=__doc__))
