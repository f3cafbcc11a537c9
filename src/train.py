"""Fine-tune a causal language model with QLoRA (4-bit NF4 base + LoRA adapters) from a recipe.

    accelerate launch --config_file launch/single.yaml src/train.py  # quickstart: offline, CPU, a few minutes
    accelerate launch src/train.py --recipe llama2_guanaco           # the seed fine-tune on one GPU
    accelerate launch --config_file launch/zero3.yaml src/train.py --recipe llama2_guanaco   # several GPUs
    accelerate launch src/train.py --recipe llama2_guanaco \\
        --set model.name=/models/llama-2-7b-chat --set data.path=/data/guanaco-llama2-1k --set training.max_steps=30
    python src/train.py --recipe llama2_guanaco --print-config       # resolved recipe + layout, loads nothing
    tensorboard --logdir runs                                        # watch

Data flows one way: recipe -> layout -> data/model -> trainer -> run folder. Every value and path is checked, and
the data read, before the run folder changes (lorafit.run.session). Each step lives in src/lorafit/.
"""

import sys

from lorafit import cli, hub, recipe
from lorafit.console import log


def train(args) -> int:
    clock = cli.Stopwatch()
    cfg = recipe.load_recipe(args.recipe, args.overrides)  # every value typed and validated
    hub.decide_offline(cfg)  # before any Hugging Face library is imported: no retry loop without a network
    from lorafit import layout, plan  # torch, and transformers' config reader for --plan; nothing more

    lay = layout.decide(cfg)
    if args.print_config or args.plan:
        print(cfg.to_yaml() + "# " + lay.describe() if args.print_config else
              plan.describe(cfg, plan.shape_of(cfg.model), plan.smallest_gpu_gib(), lay))
        return 0
    # The rest of the libraries (transformers' models, peft, TRL, bitsandbytes) load here, after lorafit's logging
    # (cli.main) and the offline decision above, both of which they read at import.
    from lorafit import console, data, dist, evaluate, model, progress, source, tb, trainer
    from lorafit.run import faults, session, summary

    console.adopt_library_loggers()
    clock.lap("start-up")  # interpreter and imports
    source.check_source(cfg.model)  # a missing model path fails here
    # The training arguments start the process group (and, under ZeRO-3, make from_pretrained shard): built first
    args_hf = trainer.build_args(cfg, lay, cfg.output.dir, has_eval=cfg.data.eval_fraction > 0)
    run = session.RunSession(cfg, lay, args.resume)  # read-only: paths, lock owner, the resume point verified
    if run.finished:
        return 0
    writer = None
    try:

        def inputs():
            src = source.materialize(cfg.model, dist.is_local_main())
            tok = model.load_tokenizer(cfg, src)
            return src, tok, data.prepare_data(cfg.data, tok, dist.is_local_main())  # tokenized once per machine

        src, tok, prepared = dist.main_first(inputs, dist.is_local_main())
        clock.lap("data")
        log.info("%s", lay.describe())
        log.info("%s", prepared.stats.summary_line())
        run.open()  # the data is valid: create the folder if new, take the lock
        net = model.load_model(cfg, lay, src, tok)
        clock.lap("model")
        writer = tb.RankZeroWriter(str(run.path / "tb") if cfg.logging.tensorboard else None, lay.is_main,
                                   run.purge_step)  # opens at the first event, once training has begun
        evals = evaluate.EvalCallback(cfg, lay, prepared.renderer, tok, prepared.eval_conversations, writer,
                                      run.results, run.path)
        shown = progress.TrainProgress(lay.is_main, cfg.logging.progress_bar, prepared.stats.eval_rows)
        callbacks = [tb.TensorBoardLogger(writer, cfg.to_yaml()), shown, evals]  # the eval line before its sample
        sft = trainer.build_trainer(cfg, lay, args_hf, net, tok, prepared, callbacks)
        console.adopt_library_loggers()  # DeepSpeed, when the launch uses it, is imported by now
        if faults.wanted():
            faults.install(sft, run)  # the tests' fault hooks; never in a normal run
        run.attach(sft)  # refuses a checkpoint of another shape; only then does the run folder change
        clock.lap("trainer")
        sft.train(resume_from_checkpoint=run.resume_path)
        if (code := run.stopped_exit_code()) is not None:  # a signal (75) or too many non-finite steps (3)
            return code
        if prepared.eval is not None and not evaluate.evaluated_at(sft.state, sft.state.global_step):
            sft.evaluate()
        run.check_end(sft.model)  # a non-finite adapter or a run of skipped steps is not finished (exit 3)
        wall = clock.lap("train")  # training and the final evaluation: summary.json's wall_time_s
        sft.save_model(str(run.path))  # adapter_model.safetensors + adapter_config.json (gathers ZeRO-3 shards)
        if lay.is_main:
            tok.save_pretrained(run.path)
        clock.lap("save")
        done = summary.write_summary(run.path, cfg, lay, sft, prepared, wall, net.get_nb_trainable_parameters()[0],
                                     extra={**run.summary_extra(sft), "phases_s": clock.laps})
        run.finish(done)
        log.info("done: %d steps, final loss %s, %s real tokens/s; adapter in %s", done["steps"],
                 f"{done['final_loss']:.4g}" if done["final_loss"] is not None else "n/a",
                 f"{done['tokens_per_second']:,.0f}" if done["tokens_per_second"] else "n/a", run.path)
        log.info("time: %s", clock.describe())
        return 0
    finally:
        run.close()  # the lock released; status.json terminal on every path; a folder refused before use removed
        if writer is not None:
            writer.close()


if __name__ == "__main__":
    sys.exit(cli.main(train, description=__doc__))
