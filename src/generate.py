"""Talk to a fine-tuned model: a run's 4-bit base plus its LoRA adapter, or a merged model folder; tokens stream.

    python src/generate.py --run runs/quickstart                      # chat; /reset forgets, empty line or Ctrl-D quits
    python src/generate.py --run runs/quickstart --prompt "Reverse the order of these words: lamp river stone"
    python src/generate.py --run runs/quickstart --input rows.jsonl --output answers.jsonl --metric exact
    python src/generate.py --run runs/quickstart --base-only --prompt "..."   # the same base without the adapter
    python src/generate.py --run runs/quickstart/merged --prompt "..."        # a merged folder (src/merge.py)
    python src/generate.py --run runs/try1/checkpoints/checkpoint-100 --prompt "..."   # a checkpoint's adapter

--run takes a run folder (its final adapter, else its newest committed checkpoint), one checkpoint folder, or a plain
Hugging Face model folder (a merged export). A run is rebuilt from its recipe.yaml exactly as it trained: the same
base, quantized the same way, with the adapter on top. Prompts are rendered in the run's chat format (the Llama-2
`[INST]` format or the tokenizer's chat template, whichever the run trained with). Decoding is greedy unless
--temperature > 0. With --prompt the answer alone goes to stdout (logs go to stderr), so scripts can capture it.

--input answers every row of a file in batches (greedy, one model load, a progress bar): rows with a `prompt` column
(and optionally `system`, `reference`), or rows of any format lorafit trains on (their first turn is the prompt, its
answer the reference). --output gets one JSON line per row: prompt, answer, and reference and score where there is a
reference (--metric exact | contains | regex, lorafit.metrics). In the chat, end a line with \\ to go on typing on the
next (a multi-line prompt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorafit import cli, data, hub, layout, model, recipe
from lorafit.console import log
from lorafit.errors import UserError
from lorafit.run import lookup
from lorafit.source import materialize


def run_format(recipe_path: Path | None, cfg: recipe.Recipe) -> str:
    """The data format the run trained with: summary.json records the detected one, the recipe may name it."""
    if recipe_path is not None and (recipe_path.parent / "summary.json").is_file():
        fmt = json.loads((recipe_path.parent / "summary.json").read_text()).get("data", {}).get("format")
        if fmt:
            return fmt
    return cfg.data.format


def load(run: Path, base_only: bool, device: str):
    """(model, tokenizer, renderer) for --run."""
    if not run.is_dir():
        raise UserError(f"--run {run}: no such folder; give a run folder (output.dir), a checkpoint or a merged model")
    recipe_path = lookup.find_recipe(run)
    cfg = recipe.load_recipe(str(recipe_path)) if recipe_path else recipe.Recipe()
    if recipe_path is None:
        hub.go_offline()  # a merged model folder: everything is local
    else:
        hub.decide_offline(cfg)  # before transformers is imported
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit import console

    console.adopt_library_loggers()
    adapter = lookup.find_adapter(run)
    if device != "auto":
        cfg = recipe.set_value(cfg, "training.device", device)
    if adapter is not None or (base_only and recipe_path is not None):
        if recipe_path is None:
            raise UserError(f"{run} has an adapter but no recipe.yaml next to it, so its base model is unknown")
        lay = layout.decide(cfg, env={})  # one process, whatever launcher started this shell
        source = materialize(cfg.model)  # a GGUF base is converted once, as in training
        tok = lookup.run_tokenizer(cfg, adapter, recipe_path.parent, source)
        kw = {"device_map": lay.device_map} if lay.device_map is not None else {}
        net = AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=model.quantization_config(cfg, lay),
            dtype=getattr(torch, cfg.quantization.compute_dtype),
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            **kw,
        )
        if adapter is not None and not base_only:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, str(adapter))
            log.info("loaded %s (4-bit: %s) with the adapter from %s", source, cfg.quantization.load_in_4bit, adapter)
        else:
            log.info("loaded the base %s alone (no adapter)", source)
    elif (run / "config.json").is_file():
        if base_only:
            raise UserError(f"--base-only needs a run folder; {run} is a model folder")
        tok = AutoTokenizer.from_pretrained(run)
        want_gpu = device != "cpu" and torch.cuda.is_available()
        net = AutoModelForCausalLM.from_pretrained(run, dtype="auto", device_map={"": 0} if want_gpu else None)
        log.info("loaded the model folder %s", run)
    else:
        raise UserError(
            f"--run {run} holds no adapter, no committed checkpoint and no config.json; give a run "
            "folder, a checkpoint folder or a merged model folder"
        )
    for m in net.modules():
        # The kernels the training run's samples and skill check used (lorafit.model turns bitsandbytes' CPU repacking
        # off), so greedy answers here equal the ones logged in TensorBoard for the same weights.
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    net.eval()
    renderer = data.make_renderer(tok, run_format(recipe_path, cfg), cfg.data)
    return net, tok, renderer, cfg


def prompt_ids(renderer, tok, history: list[tuple[str, str]], user: str, system: str | None) -> list[int]:
    """The conversation so far plus the new user turn, rendered as the run trained (earlier answers included)."""
    if not history:
        return renderer.prompt_ids(user, system)
    if isinstance(renderer, data.TemplateRenderer):  # the template renders the whole conversation at once
        msgs = [{"role": "system", "content": system}] if system else []
        for u, a in history:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        out = tok.apply_chat_template(
            msgs + [{"role": "user", "content": user}], tokenize=True, add_generation_prompt=True
        )
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    # Llama-2: every turn is `<s>[INST] u [/INST] a </s>`, so the history's training encoding is a prefix.
    return renderer.encode(data.Conversation(list(history), system)).input_ids + renderer.prompt_ids(user)


def _streamer_class():
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """TextStreamer without the answer's leading white space (Llama-2 answers start with a space token)."""

        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            super().on_finalized_text(text, stream_end)

    return Streamer


def answer(net, tok, ids: list[int], max_new_tokens: int, temperature: float, stream) -> str:
    import torch
    from transformers import GenerationConfig

    from lorafit import evaluate

    stop = evaluate.eos_ids(net, tok)
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        eos_token_id=stop,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0],
        use_cache=True,
        **({"temperature": temperature} if temperature > 0 else {}),
    )
    device = next(net.parameters()).device
    x = torch.tensor([ids], device=device)
    streamer = _streamer_class()(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = net.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg, streamer=streamer)
    new = out[0, len(ids) :].tolist()
    cut = next((i for i, t in enumerate(new) if t in stop), len(new))
    return tok.decode(new[:cut], skip_special_tokens=True).strip()


def read_turn() -> str | None:
    """One user turn from the terminal: lines ending with a backslash go on to the next line. None at Ctrl-D."""
    lines, prompt = [], "you> "
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return None
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = "...> "
            continue
        lines.append(line)
        return "\n".join(lines).strip()


def chat(net, tok, renderer, args) -> None:
    history: list[tuple[str, str]] = []
    print("lorafit chat: empty line or Ctrl-D quits, /reset forgets the conversation, a line ending in \\ goes on",
          file=sys.stderr)
    while True:
        user = read_turn()
        if user is None:
            return
        if not user:
            return
        if user == "/reset":
            history.clear()
            continue
        print("model> ", end="", flush=True)
        text = answer(
            net,
            tok,
            prompt_ids(renderer, tok, history, user, args.system),
            args.max_new_tokens,
            args.temperature,
            stream=True,
        )
        history.append((user, text))


def answer_file(net, tok, renderer, cfg, args) -> None:
    """--input: every row answered greedily in batches of --batch-size, written to --output in the input's order."""
    import torch
    from tqdm import tqdm

    from lorafit import evaluate, metrics
    from lorafit.data.prompts import read_prompts

    rows = read_prompts(Path(args.input), cfg.data)
    ids = [renderer.prompt_ids(r.user, r.system if r.system is not None else args.system) for r in rows]
    with tqdm(total=len(rows), unit="prompt", desc="generate", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        dtype = getattr(torch, cfg.quantization.compute_dtype) if next(net.parameters()).is_cuda else None
        answers = evaluate.greedy_answers(net, tok, ids, args.max_new_tokens, args.batch_size,
                                          autocast_dtype=dtype, progress=bar.update)
    scores = []
    with open(args.output, "w", encoding="utf-8") as fh:
        for r, a in zip(rows, answers):
            out = {"prompt": r.user, "answer": a}
            if r.reference is not None:
                out["reference"] = r.reference
                if args.metric:
                    out["score"] = metrics.score(args.metric, a, r.reference, args.regex)
                    scores.append(out["score"])
            fh.write(json.dumps(out, ensure_ascii=False) + "\n")
    line = f"{len(rows)} answers in {args.output}"
    if scores:
        line += f"; {args.metric} {sum(scores) / len(scores):.3f} on the {len(scores)} rows with a reference"
    log.info("%s", line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder, checkpoint folder or merged model folder")
    p.add_argument("--prompt", help="answer this one prompt and exit (the answer alone on stdout)")
    p.add_argument("--system", default=None, help="system prompt (default: the recipe's data.system_prompt)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--base-only", action="store_true", help="the run's base model without its adapter")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: CUDA when available")
    p.add_argument("--input", help="answer every row of this file (jsonl, json, csv, parquet) in batches")
    p.add_argument("--output", help="with --input: the answers, one JSON line per row (default: INPUT.answers.jsonl)")
    p.add_argument("--batch-size", type=int, default=16, help="with --input: prompts generated together (default 16)")
    p.add_argument("--metric", choices=["exact", "contains", "regex"], help="with --input: score rows with a reference")
    p.add_argument("--regex", help="with --metric regex: the pattern that finds the answer (its first group)")
    args = p.parse_args(argv)
    return cli.guarded(lambda: run(args), stream=sys.stderr)  # stdout carries only answers; logs go to stderr


def run(args) -> int:
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give a positive number of tokens")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: give 0 (greedy) or a positive temperature")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; give the text to answer")
    if args.input is not None:
        if args.prompt is not None:
            raise UserError("--prompt and --input both given; answer one prompt, or a file of them")
        if not Path(args.input).is_file():
            raise UserError(f"--input {args.input}: no such file; give a jsonl, json, csv or parquet file of prompts")
        if args.batch_size <= 0:
            raise UserError(f"--batch-size {args.batch_size}: give a positive number of prompts")
        if args.metric == "regex" and not args.regex:
            raise UserError("--metric regex needs --regex PATTERN (its first group is the answer)")
        args.output = args.output or str(Path(args.input).with_suffix("")) + ".answers.jsonl"
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise UserError(f"--output {args.output} is the input file; give another file for the answers")
    net, tok, renderer, cfg = load(Path(args.run), args.base_only, args.device)
    if args.system is None:
        args.system = cfg.data.system_prompt
    if args.input is not None:
        answer_file(net, tok, renderer, cfg, args)
    elif args.prompt is not None:
        answer(net, tok, renderer.prompt_ids(args.prompt, args.system), args.max_new_tokens, args.temperature,
               stream=True)
    else:
        chat(net, tok, renderer, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
