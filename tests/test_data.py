"""Preference data: every shape to canonical rows, checks, split, tokenization on two tokenizers, and the
`dpokit data` commands as a user runs them (real subprocess)."""

import json

import pytest

from conftest import FIXTURES
from dpokit.core.config import DataConfig
from dpokit.core.errors import UserError
from dpokit.core.templates import render, setup_chat_template
from dpokit.data import load_preferences, prompt_key
from dpokit.data.encode import encode_rows

DATA = FIXTURES / "data"


def U(text):
    return [{"role": "user", "content": text}]


def A(text):
    return [{"role": "assistant", "content": text}]


# fixture -> (extra data keys, detected format, exact canonical rows in file order)
SHAPES = {
    "explicit_text.jsonl": ({}, "explicit", [
        {"prompt": "How was the sea?", "chosen": " Calm and bright.", "rejected": " Awful."},
        {"prompt": "Name a fruit.", "chosen": " An apple.", "rejected": " A rock."},
    ]),
    "explicit_conversational.jsonl": ({}, "explicit", [
        {"prompt": [{"role": "system", "content": "Be brief."}, *U("Hi")], "chosen": A("Hello!"), "rejected": A("What.")},
        {"prompt": U("Capital of France?"), "chosen": A("Paris."), "rejected": A("Rome.")},
    ]),
    "implicit_hh.jsonl": ({}, "implicit", [
        {"prompt": U("What is 2+2?"), "chosen": A("4."), "rejected": A("5.")},
        {"prompt": [*U("Hi"), *A("Hello! How can I help?"), *U("Tell me a joke.")],
         "chosen": A("Why did the chicken cross the road?"), "rejected": A("No.")},
    ]),
    "implicit_messages.jsonl": ({}, "implicit", [
        {"prompt": U("Say yes."), "chosen": A("Yes."), "rejected": A("No.")},
    ]),
    # Row 2 has tied scores: dropped.
    "ultrafeedback_binarized.jsonl": ({}, "ultrafeedback_binarized", [
        {"prompt": U("Say hi."), "chosen": A("Hi there!"), "rejected": A("Go away.")},
        {"prompt": U("Spell cat."), "chosen": A("C-A-T."), "rejected": A("K-A-T.")},
    ]),
    # Best vs worst; the all-tied row and the single-completion row are dropped.
    "ultrafeedback_raw.jsonl": ({}, "scored", [
        {"prompt": U("Name a colour."), "chosen": A("Blue."), "rejected": A("Dunno.")},
        {"prompt": U("Add 1 and 1."), "chosen": A("2."), "rejected": A("Two, probably.")},
    ]),
    "shp.csv": ({}, "shp", [
        {"prompt": U("Why is the sky blue?"), "chosen": A("Rayleigh scattering."), "rejected": A("Because it is.")},
        {"prompt": U("Best pizza topping?"), "chosen": A("Basil, on a thin crust."), "rejected": A("Pineapple.")},
    ]),
    "columns.json": ({"columns": {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}}, "explicit", [
        {"prompt": "Is water wet?", "chosen": "It makes things wet.", "rejected": "No idea."},
        {"prompt": "What is 3*3?", "chosen": "9", "rejected": "6"},
    ]),
    "folder": ({}, "explicit", [
        {"prompt": "A?", "chosen": " Yes.", "rejected": " No."},
        {"prompt": "B?", "chosen": " Sure.", "rejected": " Never."},
        {"prompt": "C?", "chosen": " Fine.", "rejected": " Bad."},
    ]),
}


def cfg(source, **keys):
    return DataConfig(source=str(DATA / source) if "/" not in str(source) else str(source), eval_fraction=0.0, **keys)


@pytest.mark.parametrize("name", list(SHAPES))
def test_shape_to_canonical_rows(name):
    keys, fmt, expected = SHAPES[name]
    data = load_preferences(cfg(name, **keys))
    assert data.format == fmt
    assert data.train == expected
    assert data.eval == []
    # Forcing the detected format gives the same rows.
    assert load_preferences(cfg(name, format=fmt, **keys)).train == expected


def test_drop_reasons_are_counted():
    report = load_preferences(cfg("ultrafeedback_raw.jsonl")).report.train_counts
    assert report.rows_in == 4 and report.rows_out == 2
    dropped = report.dropped_by_format
    assert dropped["tied_scores"].count == 1 and dropped["tied_scores"].examples[0]["where"].endswith(":2")
    assert dropped["fewer_than_two_completions"].count == 1
    uf = load_preferences(cfg("ultrafeedback_binarized.jsonl")).report.train_counts
    assert uf.dropped_by_format["tied_scores"].count == 1


def test_scored_pairing_options():
    # min_score_gap 1.0 drops "Add 1 and 1." (8.0 vs 7.5) and the UF-binarized 8.0 vs 7.5 row.
    gap = load_preferences(cfg("ultrafeedback_raw.jsonl", min_score_gap=1.0))
    assert [r["prompt"] for r in gap.train] == [U("Name a colour.")]
    assert gap.report.train_counts.dropped_by_format["score_gap_below_min"].count == 1
    assert len(load_preferences(cfg("ultrafeedback_binarized.jsonl", min_score_gap=1.0)).train) == 1
    # best_random: chosen is the best; rejected is one of the lower-scored, the same for the same seed.
    runs = [load_preferences(cfg("ultrafeedback_raw.jsonl", pairing="best_random", seed=s)).train for s in range(6)]
    firsts = {r[0]["rejected"][0]["content"] for r in runs}
    assert all(r[0]["chosen"] == A("Blue.") for r in runs)
    assert firsts == {"Dunno.", "Red, I think."}
    assert load_preferences(cfg("ultrafeedback_raw.jsonl", pairing="best_random", seed=3)).train == runs[3]


def test_seed_notebook_recipe():
    data = load_preferences(cfg("ultrafeedback_binarized.jsonl", format="ultrafeedback_last_turn"))
    assert data.train[0] == {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "Go away."}
    assert data.report.kind == "text"


def test_system_prompt_and_rendering_on_two_tokenizers(tiny_llama, tiny_gpt2):
    row = SHAPES["explicit_conversational.jsonl"][2][1]
    _, llama = tiny_llama
    assert render(row, llama, system_prompt="Sys.") == (
        "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
        "Paris.<|im_end|>\n", "Rome.<|im_end|>\n")
    _, gpt2 = tiny_gpt2
    gpt2 = type(gpt2).from_pretrained(gpt2.name_or_path)  # a copy: the session fixture must keep "no template"
    with pytest.raises(UserError, match="data.chat_template"):
        render(row, gpt2)
    setup_chat_template(gpt2, "plain")
    assert render(row, gpt2) == ("User: Capital of France?\nAssistant: ", "Paris.<|endoftext|>\n",
                                 "Rome.<|endoftext|>\n")


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_shape_encodes_on_two_tokenizers(name, tiny_llama, tiny_gpt2):
    keys, _, expected = SHAPES[name]
    conversational = isinstance(expected[0]["prompt"], list)
    for tokenizer, template in ((tiny_llama[1], None), (tiny_gpt2[1], "plain" if conversational else None)):
        tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
        setup_chat_template(tok, template)
        data_cfg = cfg(name, chat_template=template, **keys)
        encoded, report = encode_rows(load_preferences(data_cfg).train, tok, data_cfg)
        assert len(encoded) == len(expected)
        assert report.template_checks.rows_checked == len(expected)
        for pair in encoded:
            for key in ("chosen_ids", "rejected_ids"):
                assert pair[key].count(tok.eos_token_id) == 1
            if tok.bos_token_id != tok.eos_token_id:  # LLaMA: exactly one BOS, from the tokenizer
                assert pair["prompt_ids"][0] == tok.bos_token_id and pair["prompt_ids"][1] != tok.bos_token_id


def test_template_checks_fail_loudly(tiny_llama):
    from dpokit.core.templates import CHATML

    row = SHAPES["explicit_conversational.jsonl"][2][1]
    tok = type(tiny_llama[1]).from_pretrained(tiny_llama[1].name_or_path)
    twice = CHATML.replace("'<|im_end|>\n'", "'<|im_end|><|im_end|>\n'")
    setup_chat_template(tok, twice)
    with pytest.raises(UserError, match="2 EOS"):
        encode_rows([row], tok, DataConfig(source="x.jsonl", chat_template=twice), "x")
    never = CHATML.replace("'<|im_end|>\n'", "'\n'")
    setup_chat_template(tok, never)
    with pytest.raises(UserError, match="0 EOS"):
        encode_rows([row], tok, DataConfig(source="x.jsonl", chat_template=never), "x")
    # A template that closes turns with its own special end-of-turn token (Gemma, Llama 3 style) is accepted.
    turn_token = CHATML.replace("'<|im_end|>\n'", "'</s>\n'")
    setup_chat_template(tok, turn_token)
    encoded, _ = encode_rows([row], tok, DataConfig(source="x.jsonl", chat_template=turn_token), "x")
    assert tok.convert_tokens_to_ids("</s>") in encoded[0]["chosen_ids"]
    # A template that writes the BOS itself does not get a second one from the tokenizer.
    with_bos = "{{ bos_token }}" + CHATML
    setup_chat_template(tok, with_bos)
    encoded, _ = encode_rows([row], tok, DataConfig(source="x.jsonl", chat_template=with_bos), "x")
    assert encoded[0]["prompt_ids"][:2] == [tok.bos_token_id, tok("<|im_start|>", add_special_tokens=False)["input_ids"][0]]


def test_split_keeps_each_prompt_on_one_side():
    data = load_preferences(DataConfig(source=str(DATA / "repeated_prompts.jsonl"), eval_fraction=0.4, seed=7))
    train_prompts = {prompt_key(r["prompt"]) for r in data.train}
    eval_prompts = {prompt_key(r["prompt"]) for r in data.eval}
    assert len(train_prompts) == 3 and len(eval_prompts) == 2 and not train_prompts & eval_prompts
    assert len(data.train) == 12 and len(data.eval) == 8  # all four pairs of a prompt stay together
    assert data.report.checks.prompts_shared_train_eval.eval_pairs == 0
    # Same seed, same split; another seed, another split.
    again = load_preferences(DataConfig(source=str(DATA / "repeated_prompts.jsonl"), eval_fraction=0.4, seed=7))
    assert again.eval == data.eval
    # A separate eval source that repeats training prompts is reported, not hidden.
    leaky = load_preferences(DataConfig(source=str(DATA / "repeated_prompts.jsonl"),
                                        eval_source=str(DATA / "repeated_prompts.jsonl")))
    shared = leaky.report.checks.prompts_shared_train_eval
    assert shared.eval_pairs == 20 and shared.distinct_prompts == 5 and len(shared.examples) == 3


# ---- the CLI, as a user runs it -------------------------------------------------------------------------------

def _prepare(cli, tmp_path, source, *args):
    out = tmp_path / "out"
    res = cli("data", "prepare", source, "--out", out, *args)
    return res, out


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


FAST_PREPARE = ("explicit_conversational.jsonl", "shp.csv")  # one per tokenizer; the rest run in the slow suite


@pytest.mark.parametrize("name", [n if n in FAST_PREPARE else pytest.param(n, marks=pytest.mark.slow) for n in SHAPES])
def test_prepare_writes_canonical_rows(cli, tmp_path, name):
    keys, fmt, expected = SHAPES[name]
    args = []
    if "columns" in keys:
        args += ["--columns", ",".join(f"{k}={v}" for k, v in keys["columns"].items())]
    # Alternate tokenizers: the GPT-2 one has no chat template, so conversational data names one.
    if list(SHAPES).index(name) % 2:
        args += ["--model", "dpokit-tiny-gpt2"]
        if isinstance(expected[0]["prompt"], list):
            args += ["--chat-template", "plain"]
    res, out = _prepare(cli, tmp_path, DATA / name, *args)
    assert res.returncode == 0, res.stderr[-1500:]
    assert _rows(out / "train.jsonl") == expected
    assert not (out / "eval.jsonl").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == fmt and report["n_train"] == len(expected)


@pytest.mark.slow
def test_prepare_split_overwrite_and_inspect(cli, tmp_path):
    res, out = _prepare(cli, tmp_path, DATA / "repeated_prompts.jsonl", "--eval-fraction", "0.4", "--seed", "7")
    assert res.returncode == 0, res.stderr[-1500:]
    train, evals = _rows(out / "train.jsonl"), _rows(out / "eval.jsonl")
    assert len(train) == 12 and len(evals) == 8
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    before = (out / "train.jsonl").read_bytes()
    again, _ = _prepare(cli, tmp_path, DATA / "explicit_text.jsonl")
    assert again.returncode == 2 and "--overwrite" in again.stderr and (out / "train.jsonl").read_bytes() == before
    again, _ = _prepare(cli, tmp_path, DATA / "explicit_text.jsonl", "--overwrite")
    assert again.returncode == 0 and len(_rows(out / "train.jsonl")) == 2 and not (out / "eval.jsonl").exists()
    shown = cli("data", "inspect", DATA / "checks.jsonl", "--model", "dpokit-tiny-gpt2", "--max-length", "16")
    assert shown.returncode == 0, shown.stderr[-1500:]
    assert "chosen longer in 50%" in shown.stdout and "over max_length" in shown.stdout


@pytest.mark.parametrize("name, where, words", [
    ("bad_json.jsonl", "bad_json.jsonl:3", "invalid JSON"),
    ("missing_field.jsonl", "missing_field.jsonl:2", "missing field 'rejected'"),
    ("non_string.jsonl", "non_string.jsonl:2", "field 'chosen'"),
])
def test_malformed_input_exit_2_naming_the_line(cli, tmp_path, name, where, words):
    res, out = _prepare(cli, tmp_path, DATA / name)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and words in lines[0] and "Traceback" not in res.stderr
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("name, where", [("bad_json.jsonl", "bad_json.jsonl:3"),
                                         ("missing_field.jsonl", "missing_field.jsonl:2"),
                                         ("non_string.jsonl", "non_string.jsonl:2")])
def test_on_error_skip_counts_rows(tmp_path, name, where):
    from dpokit.data.prepare import prepare

    result = prepare(cfg(name, on_error="skip"), tmp_path / "out", "dpokit-tiny-gpt2")
    malformed = result.report.train_counts.malformed
    assert malformed.count == 1 and malformed.examples[0]["where"].endswith(where)
    assert len(_rows(tmp_path / "out" / "train.jsonl")) == result.report.train_counts.rows_in - 1


def test_on_error_skip_cli(cli, tmp_path):
    res, out = _prepare(cli, tmp_path, DATA / "bad_json.jsonl", "--on-error", "skip")
    assert res.returncode == 0, res.stderr[-1500:]
    report = json.loads((out / "report.json").read_text())
    assert report["train_counts"]["malformed"]["by_kind"] == {"invalid_json": 1} and report["n_train"] == 3


def test_unknown_shape_names_the_fix(cli, tmp_path):
    res, _ = _prepare(cli, tmp_path, DATA / "columns.json")
    # `dpokit data prepare` takes --columns and --format: the message names the flags, not the config keys
    assert res.returncode == 2 and "--columns" in res.stderr and "columns.json item 1" in res.stderr
    assert "data.columns" not in res.stderr


def test_report_numbers_match_hand_count(cli, tmp_path):
    """checks.jsonl by hand (GPT-2 tokenizer: ' the' is one token, no BOS, EOS appended to each response):

    row  prompt  chosen  rejected  note
    1    1       3+1=4   1+1=2     chosen longer
    2    2       2+1=3   4+1=5
    3    3       5+1=6   2+1=3     chosen longer
    4    2+19=21 1+1=2   2+1=3     21 + 3 = 24 > max_length 16 (a leading "the" is 2 tokens)
    5    = row 1 4       2         duplicate (kept), chosen longer
    6    chosen == rejected        dropped before tokenization
    7    "" (1)  1+1=2   3+1=4     empty prompt (kept)
    chosen mean 21/6 = 3.5, rejected mean 19/6 = 3.1667, chosen longer 3/6 = 0.5.
    """
    from dpokit.core.models import load_tokenizer

    tok = load_tokenizer("dpokit-tiny-gpt2")
    assert len(tok("the" + " the" * 19)["input_ids"]) == 21 and len(tok(" the" * 5)["input_ids"]) == 5

    res, out = _prepare(cli, tmp_path, DATA / "checks.jsonl", "--model", "dpokit-tiny-gpt2", "--max-length", "16")
    assert res.returncode == 0, res.stderr[-1500:]
    report = json.loads((out / "report.json").read_text())
    tok_report = report["train_tokenization"]
    given = {k: v for k, v in tok_report["length_bias"].items() if v is not None}  # other kinds' fields are null
    assert given == {"chosen_mean_tokens": 3.5, "rejected_mean_tokens": 3.1667, "chosen_longer_fraction": 0.5}
    over = tok_report["over_max_length"]
    assert over["count"] == 1 and over["examples"][0]["where"].endswith("checks.jsonl:4")
    assert over["examples"][0]["tokens"] == "prompt 21 + longest response 3"
    assert tok_report["truncated"] == 1 and tok_report["dropped_over_max_length"] == 0
    assert report["n_train"] == 6
    assert report["train_counts"]["identical_pairs_dropped"]["count"] == 1
    checks = report["checks"]["train"]
    assert checks["duplicate_pairs"]["count"] == 1 and checks["duplicate_pairs"]["examples"][0]["where"].endswith(":5")
    assert checks["empty_fields"]["prompt"]["count"] == 1

    # The other truncation choices, in-process (same code path as the command).
    from dpokit.data.prepare import prepare

    drop = prepare(cfg("checks.jsonl", max_length=16, truncation="drop"), tmp_path / "drop", "dpokit-tiny-gpt2")
    assert drop.report.n_train == 5 and drop.report.train_tokenization.dropped_over_max_length == 1
    assert len(_rows(tmp_path / "drop" / "train.jsonl")) == 5
    with pytest.raises(UserError, match=r"checks.jsonl:4: prompt \+ response is 24 tokens"):
        prepare(cfg("checks.jsonl", max_length=16, truncation="error"), tmp_path / "err", "dpokit-tiny-gpt2")
    assert not (tmp_path / "err").exists()
