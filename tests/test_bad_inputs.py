"""Bad input sweep: each case is one line on stderr (what, where, how to fix), exit code 2, no traceback, and
nothing written (no run folder; an existing one untouched)."""

import json

import pytest
import yaml

from conftest import run_cli, tiny_config

GOOD_ROW = {"prompt": "How was the sea?", "chosen": " Lovely.", "rejected": " Ugly."}


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, **sections):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **sections)))
    return path


def _assert_user_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: ")
    assert ";" in line  # the part after the semicolon says how to fix it
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _case_malformed_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  source: [unclosed\ntrain:\n  beta: 0.1\n")
    return path, ["malformed YAML", "line"]


def _case_unknown_key(tmp_path):
    return _config(tmp_path, train={"bta": 0.1}), ["train.bta", "unknown key", "beta"]


def _case_wrong_type(tmp_path):
    return _config(tmp_path, train={"batch_size": "many"}), ["train.batch_size", "'many'"]


def _case_missing_file(tmp_path):
    return _config(tmp_path, data={"source": str(tmp_path / "missing.jsonl")}), ["data.source", "missing.jsonl", "not found"]


def _case_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    return _config(tmp_path, data={"source": str(tmp_path / "empty.jsonl")}), ["empty.jsonl", "no rows"]


def _case_every_row_dropped(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": " Same.", "rejected": " Same."} for i in range(6)]
    src = _write_rows(tmp_path / "same.jsonl", rows)
    return _config(tmp_path, data={"source": str(src)}), ["same.jsonl", "every row was dropped", "6 with chosen == rejected"]


def _case_non_utf8(tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes(json.dumps(GOOD_ROW).encode() + b"\n" + '{"prompt": "Caf\u00e9?", "chosen": " a", "rejected": " b"}\n'.encode("latin-1"))
    return _config(tmp_path, data={"source": str(src)}), ["latin1.jsonl:2", "not UTF-8", "UTF-8"]


def _case_too_long_with_truncation_error(tmp_path):
    rows = [GOOD_ROW] * 5 + [{"prompt": "Tell me everything. " * 40, "chosen": " Fine.", "rejected": " Bad."}]
    src = _write_rows(tmp_path / "long.jsonl", rows)
    cfg = _config(tmp_path, data={"source": str(src), "truncation": "error", "max_length": 32, "eval_fraction": 0.0})
    return cfg, ["row 6", "data.max_length=32", "data.truncation"]


def _case_no_chat_template(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "Nice."}],
             "rejected": [{"role": "assistant", "content": "Bad."}]} for i in range(6)]
    src = _write_rows(tmp_path / "chat.jsonl", rows)
    cfg = _config(tmp_path, model={"name_or_path": "dpokit-tiny-gpt2"}, data={"source": str(src)})
    return cfg, ["chat template", "dpokit-tiny-gpt2", "data.chat_template"]


CASES = {
    "malformed_yaml": _case_malformed_yaml,
    "unknown_key": _case_unknown_key,
    "wrong_type": _case_wrong_type,
    "missing_file": _case_missing_file,
    "empty_dataset": _case_empty_dataset,
    "every_row_dropped": _case_every_row_dropped,
    "non_utf8": _case_non_utf8,
    "too_long_truncation_error": _case_too_long_with_truncation_error,
    "no_chat_template": _case_no_chat_template,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    config, needles = CASES[case](tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli("train", config)
    _assert_user_error(res, *needles)
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # --debug shows where it came from instead.
    if case == "empty_dataset":
        assert "Traceback" in run_cli("--debug", "train", config).stderr


def test_existing_output_folder_is_refused_and_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    res = run_cli("train", _config(tmp_path))
    _assert_user_error(res, str(run), "--overwrite")
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_overwrite_deletes_nothing_when_validation_fails(tmp_path):
    """--overwrite replaces the run folder only after the data and model validated."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    (tmp_path / "empty.jsonl").write_text("")
    res = run_cli("train", _config(tmp_path, data={"source": str(tmp_path / "empty.jsonl")}), "--overwrite")
    _assert_user_error(res, "no rows")
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_tokenizer_without_pad_token_trains_with_eos_as_pad(tmp_path):
    cfg = _config(tmp_path, model={"name_or_path": "dpokit-tiny-gpt2"}, train={"max_steps": 2},
                  eval={"enabled": False})
    res = run_cli("train", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    tok = json.loads((tmp_path / "run" / "model" / "tokenizer_config.json").read_text())
    assert tok["pad_token"] == tok["eos_token"] == "<|endoftext|>"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # finite, not NaN


def test_tokenizer_without_pad_or_eos_is_a_clear_error(tmp_path):
    from dpokit.errors import UserError
    from dpokit.models import build_tiny_tokenizer, load_tokenizer

    tok = build_tiny_tokenizer("gpt2")
    tok.eos_token = None
    tok.bos_token = None
    tok.unk_token = None
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(UserError, match="neither a pad nor an EOS token"):
        load_tokenizer(str(tmp_path / "tok"))
