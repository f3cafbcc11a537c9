"""Formatting golden tests: what the model is trained on, token by token.

With ../shared present these run on real guanaco-llama2-1k rows and the real Llama-2 tokenizer, and also check
exact sentencepiece tokens at the prompt/answer boundary. Without it they run on conftest's fixture rows and
word-level tokenizer; only the assertions that name real Llama-2 tokens are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURE_ROWS, has_shared

from lorafit import data, model, source
from lorafit.data import pipeline as prepare_mod
from lorafit.errors import UserError
from lorafit.recipe import DataConfig, Recipe

FIXTURES = Path(__file__).parent / "fixtures"
REAL = has_shared()
# Real rows: 0 (one turn), 3 (two turns), 899 (three turns, the second with an empty answer), 42 (one turn).
# Fallback rows: conftest.FIXTURE_ROWS 0 (one turn) and 3 (two turns).
GUANACO_ROWS = [0, 3, 42, 899] if REAL else [0, 3]
needs_real = pytest.mark.skipif(not REAL, reason="needs ../shared (real guanaco rows and Llama-2 tokenizer)")


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return model.load_tokenizer(Recipe(), str(tokenizer_dir))


@pytest.fixture(scope="module")
def guanaco_rows(guanaco_dir) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(guanaco_dir / "train-00000-of-00001.parquet").to_pylist()


def squash(text: str) -> str:
    """Text without white space: decoding does not restore spaces around special tokens exactly."""
    return "".join(text.split())


def runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """(value, start, end) of each run of equal mask values."""
    out, start = [], 0
    for j in range(1, len(mask) + 1):
        if j == len(mask) or mask[j] != mask[start]:
            out.append((mask[start], start, j))
            start = j
    return out


def check_llama2(tok, conv: data.Conversation, enc: data.Encoded) -> None:
    """Meta's Llama-2 chat layout: per turn `BOS [INST] user [/INST] answer EOS`; only answers (and their EOS) train."""
    ids, mask = enc.input_ids, enc.completion_mask
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert len(ids) == len(mask)
    assert ids[0] == bos and ids[-1] == eos
    starts = [j for j, t in enumerate(ids) if t == bos]
    assert len(starts) == len(conv.turns), "one BOS per turn"
    assert all(ids[j - 1] == eos for j in starts[1:]), "every later BOS follows the previous turn's EOS"
    assert all(not (a == b == bos) for a, b in zip(ids, ids[1:])), "never two BOS in a row"
    exact = tok.unk_token_id not in ids  # the fallback tokenizer maps words outside its vocabulary to <unk>
    assert exact or not REAL
    for k, (start, end) in enumerate(zip(starts, starts[1:] + [len(ids)])):
        user, answer = conv.turns[k]
        seg_ids, seg_mask = ids[start:end], mask[start:end]
        assert seg_ids[-1] == eos
        if not answer:  # context only: an empty answer teaches nothing but "stop at once"
            assert seg_mask == [0] * len(seg_mask)
            if exact:
                assert squash(tok.decode(seg_ids)) == squash(f"<s>[INST] {user} [/INST] </s>")
            continue
        assert [v for v, _, _ in runs(seg_mask)] == [0, 1], "the prompt is masked, then answer + EOS all carry loss"
        b = seg_mask.index(1)
        if exact:
            system = f"<<SYS>> {conv.system} <</SYS>> " if (conv.system and k == 0) else ""
            assert squash(tok.decode(seg_ids[:b])) == squash(f"<s>[INST] {system}{user} [/INST]")
            assert squash(tok.decode(seg_ids[b:-1])) == squash(answer)
        if REAL:
            # Llama-2's sentencepiece: "[/INST]" at the end of a prompt is ▁[ / INST ]; the answer starts after it.
            assert tok.convert_ids_to_tokens(seg_ids[b - 4 : b]) == ["▁[", "/", "INST", "]"]


@pytest.mark.parametrize("row", GUANACO_ROWS)
def test_guanaco_row_golden(tok, guanaco_rows, row):
    text = guanaco_rows[row]["text"]
    conv = data.to_conversation(guanaco_rows[row], "llama2", DataConfig(format="llama2"))
    assert len(conv.turns) == text.count("[INST]")
    enc = data.Llama2Renderer(tok).encode(conv)
    check_llama2(tok, conv, enc)
    # Nothing lost, nothing added: the training text is the row's text, up to white space.
    if tok.unk_token_id not in enc.input_ids:
        assert squash(tok.decode(enc.input_ids)) == squash(text)


@needs_real
def test_guanaco_row0_boundary_tokens(tok, guanaco_rows):
    # Row 0 begins "<s>[INST] Me gradué hace poco ... [/INST] Esto vale tanto ..."; Llama-2's tokenizer splits the
    # answer's first word as ▁Est|o (read off tokenizer.model with sentencepiece, not from lorafit).
    conv = data.to_conversation(guanaco_rows[0], "llama2", DataConfig(format="llama2"))
    enc = data.Llama2Renderer(tok).encode(conv)
    b = enc.completion_mask.index(1)
    assert tok.convert_ids_to_tokens(enc.input_ids[:5]) == ["<s>", "▁[", "INST", "]", "▁Me"]
    assert tok.convert_ids_to_tokens(enc.input_ids[b - 4 : b + 3]) == ["▁[", "/", "INST", "]", "▁Est", "o", "▁vale"]
    assert enc.input_ids[b - 1] != enc.input_ids[b]


@needs_real
def test_guanaco_row899_empty_answer_turn_is_context_only(tok, guanaco_rows):
    # Row 899's second turn is "[INST] Пожалуйста напиши сценарий этого видео [/INST]  </s>": no answer.
    conv = data.to_conversation(guanaco_rows[899], "llama2", DataConfig(format="llama2"))
    assert [bool(a) for _, a in conv.turns] == [True, False, True]
    enc = data.Llama2Renderer(tok).encode(conv)
    ids, mask = enc.input_ids, enc.completion_mask
    second = [j for j, t in enumerate(ids) if t == tok.bos_token_id][1]
    eos_after = ids.index(tok.eos_token_id, second)
    assert tok.convert_ids_to_tokens(ids[eos_after - 4 : eos_after + 1]) == ["▁[", "/", "INST", "]", "</s>"]
    assert mask[second : eos_after + 1] == [0] * (eos_after + 1 - second)


def test_empty_answer_turn_carries_no_loss(tok):
    # Our own three-turn row whose middle turn has no answer (the shape of guanaco row 899).
    text = (
        "<s>[INST] What is 12 times 12? [/INST] 12 times 12 is 144. </s><s>[INST] Is the sun a star? [/INST]  "
        "</s><s>[INST] Give me a synonym for happy. [/INST] Joyful. </s>"
    )
    conv = data.to_conversation({"text": text}, "llama2", DataConfig(format="llama2"))
    enc = data.Llama2Renderer(tok).encode(conv)
    check_llama2(tok, conv, enc)
    assert [v for v, _, _ in runs(enc.completion_mask)] == [0, 1, 0, 1]  # turn 2 sits inside the second 0-run


def test_pad_token_differs_from_eos(tok):
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token_id != tok.bos_token_id
    if REAL:
        assert tok.pad_token == "<unk>"  # Llama-2 ships no pad token; <unk> is an existing, never-trained id


def test_pad_token_equal_to_eos_is_refused(tok):
    t = model.load_tokenizer(Recipe(), tok.name_or_path)
    with pytest.raises(UserError, match="equals the EOS token"):
        model.choose_pad_token(t, t.eos_token)


def test_a_pad_token_outside_the_models_embedding_is_replaced(tok):
    # Qwen2's tokenizer class names <|endoftext|> as pad even where the files lack it, one id past the model's
    # embedding: padding with it would fail mid-step with an IndexError (seen with a tiny Qwen2 in test_families)
    t = model.load_tokenizer(Recipe(), tok.name_or_path)
    t.add_special_tokens({"pad_token": "<|endoftext|>"})
    rows = len(t) - 1  # the model knows every id but the one just added
    assert t.pad_token_id == rows
    model.choose_pad_token(t, None, vocab_size=rows)
    assert t.pad_token == t.unk_token and t.pad_token_id < rows
    with pytest.raises(UserError, match="outside the model's"):
        model.choose_pad_token(t, "<|endoftext|>", vocab_size=rows)


def test_completion_only_off_trains_every_token(tok, guanaco_rows):
    conv = data.to_conversation(guanaco_rows[0], "llama2", DataConfig(format="llama2"))
    enc = data.Llama2Renderer(tok).encode(conv)
    cfg = DataConfig(format="llama2", completion_only=False)
    out = prepare_mod._encode_all([conv], data.Llama2Renderer(tok), cfg, data.DataStats(), True)
    assert out["input_ids"] == [enc.input_ids] and out["completion_mask"] == [[1] * len(enc.input_ids)]


# ------------------------------------------------------------------------------------------------------------------
# alpaca and messages rows


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def test_alpaca_rows_use_llama2_format_without_a_chat_template(tok):
    assert not tok.chat_template
    cfg = DataConfig(path=str(FIXTURES / "alpaca.jsonl"))
    rows = read_jsonl("alpaca.jsonl")
    assert data.detect_format(set(rows[0]), cfg, "alpaca.jsonl") == "alpaca"
    renderer = data.make_renderer(tok, "alpaca", cfg)
    assert renderer.name == "llama2"
    for rec in rows:
        conv = data.to_conversation(rec, "alpaca", cfg)
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        assert conv.turns == [(user, rec["output"])]
        check_llama2(tok, conv, renderer.encode(conv))


def test_messages_rows_use_llama2_format_without_a_chat_template(tok):
    cfg = DataConfig(path=str(FIXTURES / "messages.jsonl"))
    rows = read_jsonl("messages.jsonl")
    renderer = data.make_renderer(tok, "messages", cfg)
    assert renderer.name == "llama2"
    convs = [data.to_conversation(rec, "messages", cfg) for rec in rows]
    assert convs[1].system == "You answer in one short sentence." and len(convs[1].turns) == 2
    for conv in convs:
        check_llama2(tok, conv, renderer.encode(conv))
    if REAL:
        enc = renderer.encode(convs[1])
        prompt = enc.input_ids[: enc.completion_mask.index(1)]
        assert tok.decode(prompt).startswith("<s> [INST] <<SYS>>\nYou answer in one short sentence.\n<</SYS>>\n\n")


SMOLLM2 = source.cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1"
# A chat template of our own: ends assistant turns with EOS and a newline, like ChatML. Its generation prompt ends
# in a newline, as real templates' do: a trailing space would tokenize differently once the answer follows.
TINY_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} :\n{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant :\n{% endif %}"
)


@pytest.fixture(params=["smollm2", "tiny-template"])
def template_tok(request, tokenizer_dir, tmp_path):
    if request.param == "smollm2":
        if not (SMOLLM2 / "tokenizer.json").exists():
            pytest.skip(f"no cached SmolLM2 tokenizer in {SMOLLM2} (the quickstart writes it)")
        return model.load_tokenizer(Recipe(), str(SMOLLM2))
    t = model.load_tokenizer(Recipe(), str(tokenizer_dir))
    t.chat_template = TINY_TEMPLATE
    return t


def test_messages_rows_use_the_tokenizers_chat_template(template_tok):
    tok = template_tok
    cfg = DataConfig(path=str(FIXTURES / "messages.jsonl"))
    renderer = data.make_renderer(tok, "messages", cfg)
    assert renderer.name == "tokenizer"
    assert tok.pad_token_id != tok.eos_token_id
    for rec in read_jsonl("messages.jsonl"):
        conv = data.to_conversation(rec, "messages", cfg)
        enc = renderer.encode(conv)
        ids, mask = enc.input_ids, enc.completion_mask
        msgs = rec["messages"]
        # The template's own rendering of the whole conversation is what the model sees, token for token.
        whole = tok.apply_chat_template(msgs, tokenize=True)
        whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
        assert ids == whole
        answers = [r for r in runs(mask) if r[0] == 1]
        assert len(answers) == len(conv.turns)
        for k, ((_, s, e), (_, answer)) in enumerate(zip(answers, conv.turns)):
            assert ids[e - 1] == tok.eos_token_id, "the last token that carries loss ends the answer"
            if tok.unk_token_id not in ids[s:e]:  # the fallback tokenizer lacks some words
                assert squash(tok.decode(ids[s : e - 1])) == squash(answer)
            # Up to the boundary is exactly the generation prompt, as at inference.
            gen = tok.apply_chat_template(
                msgs[: 2 * k + 1 + (msgs[0]["role"] == "system")], tokenize=True, add_generation_prompt=True
            )
            assert ids[:s] == list(gen["input_ids"] if hasattr(gen, "keys") else gen)
        # After the last EOS only the template's separator follows, and it carries no loss.
        assert all(tok.decode([t]).strip() == "" for t in ids[answers[-1][2] :])


def test_template_without_eos_gets_one_after_every_answer(tokenizer_dir):
    t = model.load_tokenizer(Recipe(), str(tokenizer_dir))
    t.chat_template = (
        "{% for m in messages %}{{ m['role'] }} :\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant :\n{% endif %}"
    )
    cfg = DataConfig(chat_template="tokenizer")
    conv = data.to_conversation(read_jsonl("messages.jsonl")[1], "messages", cfg)  # two turns
    enc = data.make_renderer(t, "messages", cfg).encode(conv)
    ids, mask = enc.input_ids, enc.completion_mask
    answers = [(s, e) for v, s, e in runs(mask) if v == 1]
    assert len(answers) == 2 and all(ids[e - 1] == t.eos_token_id for _, e in answers)
    assert ids.count(t.eos_token_id) == 2
    whole = t.apply_chat_template(read_jsonl("messages.jsonl")[1]["messages"], tokenize=True)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert [i for i in ids if i != t.eos_token_id] == whole  # the template's text, plus the EOS ids only


def test_chat_template_tokenizer_without_one_is_a_user_error(tok):
    with pytest.raises(UserError, match="has no chat template"):
        data.make_renderer(tok, "messages", DataConfig(chat_template="tokenizer"))


# ------------------------------------------------------------------------------------------------------------------
# The whole preparation


def test_prepare_guanaco_counts_truncation_and_splits_deterministically(tok, guanaco_dir):
    max_length = 64 if REAL else 16  # short enough that some rows of either data set are cut
    cfg = DataConfig(path=str(guanaco_dir), format="llama2", max_length=max_length, eval_fraction=0.1, max_rows=40)
    a = data.prepare(cfg, tok)
    b = data.prepare(cfg, tok)
    n = 40 if REAL else len(FIXTURE_ROWS) * 4  # the fallback parquet holds the fixture rows four times
    n_eval = round(n * 0.1)
    # Rows whose prompt alone fills max_length are dropped (train or eval) and counted.
    assert a.stats.rows == n and a.stats.eval_rows <= n_eval
    assert a.stats.train_rows + a.stats.eval_rows + a.stats.dropped_fully_truncated == n
    assert a.stats.truncated_rows > 0
    assert a.eval["input_ids"] == b.eval["input_ids"] and a.train["input_ids"] == b.train["input_ids"]
    other = data.prepare(dataclasses.replace(cfg, seed=7), tok)
    assert [c.turns for c in other.eval_conversations] != [c.turns for c in a.eval_conversations]
    for ids, mask in zip(a.train["input_ids"], a.train["completion_mask"]):
        assert len(ids) <= max_length and len(ids) == len(mask) and ids[0] == tok.bos_token_id and any(mask)
    assert a.stats.train_tokens == sum(map(len, a.train["input_ids"]))
    assert a.stats.train_answer_tokens == sum(map(sum, a.train["completion_mask"]))


def test_truncation_is_counted_and_prompt_only_rows_dropped(tok):
    long_answer = " ".join(["The capital of France is Paris."] * 30)
    long_prompt = " ".join(["What is the capital of France?"] * 30)
    rows = [
        {"text": f"<s>[INST] Is the sun a star? [/INST] {long_answer} </s>"},
        {"text": f"<s>[INST] {long_prompt} [/INST] Paris. </s>"},
        {"text": "<s>[INST] Is the sun a star? [/INST] Yes. </s>"},
    ]
    convs = [data.to_conversation(r, "llama2", DataConfig()) for r in rows]
    stats = data.DataStats()
    out = prepare_mod._encode_all(convs, data.Llama2Renderer(tok), DataConfig(max_length=32), stats, True)
    assert stats.truncated_rows == 2 and stats.dropped_fully_truncated == 1
    assert [len(x) for x in out["input_ids"]][0] == 32 and len(out["input_ids"]) == 2


def test_long_rows_do_not_trigger_the_tokenizers_length_warning(tokenizer_dir, capfd):
    t = model.load_tokenizer(Recipe(), str(tokenizer_dir))  # a fresh tokenizer: it warns once per instance
    t.model_max_length = 8
    conv = data.to_conversation({"text": FIXTURE_ROWS[4]}, "llama2", DataConfig())
    prepare_mod._encode_all([conv], data.Llama2Renderer(t), DataConfig(max_length=16), data.DataStats(), True)
    assert "Token indices sequence length" not in capfd.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet", "folder", "saved"])
def test_local_sources(tmp_path, tok, suffix):
    import datasets

    rows = [{"text": t} for t in FIXTURE_ROWS]
    if suffix == ".csv":
        path = tmp_path / "d.csv"
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    elif suffix == ".json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == "folder":
        path = tmp_path / "dir"
        (path / "sub").mkdir(parents=True)
        shutil.copy(FIXTURES / "bad" / "non_string.jsonl", path / "a.jsonl")  # read in sorted order: a first
        (path / "sub" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = DataConfig(path=str(path), bad_rows="skip")
        p = data.prepare(cfg, tok)
        assert p.stats.rows == 3 + len(rows) and p.stats.skipped_rows == 1 and p.stats.train_rows == 2 + len(rows)
        assert "a.jsonl line 3 column 'text' is list" in p.stats.skipped_examples[0]
        return
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
        with pytest.raises(UserError, match="no split 'test'"):
            data.prepare(DataConfig(path=str(path), split="test"), tok)
    p = data.prepare(DataConfig(path=str(path)), tok)
    assert p.stats.format == "llama2" and p.stats.rows == len(rows) == p.stats.train_rows


def test_a_folder_with_splits_reads_only_the_chosen_one(tmp_path, tok):
    # A hub snapshot: data/<split>-00000-of-00001.jsonl; the test split must not be trained on.
    (tmp_path / "data").mkdir()
    (tmp_path / ".cache").mkdir()
    for split, rows in (("train", FIXTURE_ROWS[:5]), ("test", FIXTURE_ROWS[5:])):
        text = "".join(json.dumps({"text": t}) + "\n" for t in rows)
        (tmp_path / "data" / f"{split}-00000-of-00001.jsonl").write_text(text)
    (tmp_path / ".cache" / "junk.json").write_text("not json")  # hidden folders are never data
    (tmp_path / "README.md").write_text("# a dataset card")
    assert data.prepare(DataConfig(path=str(tmp_path)), tok).stats.rows == 5
    assert data.prepare(DataConfig(path=str(tmp_path), split="test"), tok).stats.rows == len(FIXTURE_ROWS) - 5
    with pytest.raises(UserError, match=r"holds the splits \['test', 'train'\] \(by file name\), not 'validation'"):
        data.prepare(DataConfig(path=str(tmp_path), split="validation"), tok)


def test_encodings(tmp_path, tok):
    good = json.dumps({"text": FIXTURE_ROWS[0]})
    bom = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark, as Windows editors write
    bom.write_bytes(b"\xef\xbb\xbf" + (good + "\n" + good + "\n").encode())
    assert data.prepare(DataConfig(path=str(bom)), tok).stats.rows == 2
    csv_bom = tmp_path / "bom.csv"
    csv_bom.write_bytes(b"\xef\xbb\xbftext\n" + f'"{FIXTURE_ROWS[1]}"\n'.encode())
    assert data.prepare(DataConfig(path=str(csv_bom)), tok).stats.format == "llama2"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((good + "\n").encode() + '{"text": "<s>[INST] Café? [/INST] Oui. </s>"}\n'.encode("latin-1"))
    # '{"text": "<s>[INST] Caf' is 23 bytes: the latin-1 é is byte 24 of line 2.
    with pytest.raises(UserError, match=r"latin.jsonl line 2 is not UTF-8 text \(byte 24\); fix the line"):
        data.prepare(DataConfig(path=str(latin)), tok)
    assert data.prepare(DataConfig(path=str(latin), bad_rows="skip"), tok).stats.skipped_rows == 1
    for suffix in (".json", ".csv"):
        other = tmp_path / f"latin{suffix}"
        other.write_bytes("text\nCafé".encode("latin-1") if suffix == ".csv" else '[{"text": "Café"}]'.encode("cp1252"))
        with pytest.raises(UserError, match=rf"latin{suffix} is not UTF-8 text"):
            data.prepare(DataConfig(path=str(other)), tok)


def test_auto_format_detection():
    cfg = DataConfig()
    assert data.detect_format({"text"}, cfg, "x") == "llama2"
    assert data.detect_format({"instruction", "input", "output"}, cfg, "x") == "alpaca"
    assert data.detect_format({"messages", "text"}, cfg, "x") == "messages"
    with pytest.raises(UserError, match=r"x: cannot tell the format from columns \['answer', 'prompt'\]"):
        data.detect_format({"prompt", "answer"}, cfg, "x")


# ------------------------------------------------------------------------------------------------------------------
# Bad data, in process (the CLI's exit code and clean-up are in test_cli_errors.py)

BAD = FIXTURES / "bad"
BAD_CASES = {
    # file: (what the one-line message must contain, ...)
    "empty.jsonl": ("empty.jsonl has no rows",),
    "missing_column.jsonl": (
        "missing_column.jsonl",
        "format 'llama2' needs column(s) ['text']",
        "found ['answer', 'prompt']",
    ),
    "non_string.jsonl": ("non_string.jsonl line 3", "column 'text' is list, not text"),
    "empty_text.jsonl": ("empty_text.jsonl line 2", "column 'text' is empty"),
    "unparseable.jsonl": ("unparseable.jsonl line 4 is not valid JSON",),
    "no_answer.jsonl": ("no_answer.jsonl line 3", "has no answer after [/INST]", "data.completion_only=false"),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_data_message(tok, name):
    with pytest.raises(UserError) as e:
        data.prepare(DataConfig(path=str(BAD / name), format="llama2"), tok)
    msg = str(e.value)
    assert "\n" not in msg
    for part in BAD_CASES[name]:
        assert part in msg, msg


def test_missing_file_message(tok, tmp_path):
    with pytest.raises(UserError, match=r"data.path .*nope.jsonl does not exist"):
        data.prepare(DataConfig(path=str(tmp_path / "nope.jsonl")), tok)


def test_row_without_the_column_is_named(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "<s>[INST] Hi [/INST] Yo </s>"}\n{"prompt": "Hi"}\n')
    with pytest.raises(UserError, match=r"d.jsonl line 2 has no value in column 'text'"):
        data.prepare(DataConfig(path=str(path)), tok)


def test_no_prompt_while_completion_only(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "<s>[INST] Hi [/INST] Yo </s>"}\n{"text": "just some text </s>"}\n')
    with pytest.raises(UserError, match=r"d.jsonl line 2 has no '\[INST\] ... \[/INST\]' prompt"):
        data.prepare(DataConfig(path=str(path)), tok)
    p = data.prepare(DataConfig(path=str(path), completion_only=False), tok)
    assert p.stats.train_rows == 2


def test_bad_rows_skip_counts_every_class(tok):
    p = data.prepare(DataConfig(path=str(BAD / "mixed.jsonl"), bad_rows="skip"), tok)
    # mixed.jsonl: lines 2 (broken JSON), 4 (number), 6 (empty), 8 (no answer), 9 (no text column) are bad.
    assert p.stats.skipped_rows == 5 and p.stats.rows == 12 and p.stats.train_rows == 7
    lines = sorted(int(m.split(" line ")[1].split()[0]) for m in p.stats.skipped_examples)
    assert lines == [2, 4, 6, 8, 9]


def test_every_row_bad_is_a_user_error(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": ""}\n{"text": 3}\n')
    with pytest.raises(UserError, match="every row was skipped as malformed"):
        data.prepare(DataConfig(path=str(path), bad_rows="skip"), tok)
    path.write_text('{"text": \n{"text": 3\n')  # no line parses at all
    with pytest.raises(UserError, match="every row was skipped as malformed, e.g. .*line 1 is not valid JSON"):
        data.prepare(DataConfig(path=str(path), bad_rows="skip"), tok)
