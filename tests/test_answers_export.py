"""`dpokit eval RUN_DIR --export alpaca_eval|arena_hard FILE`: the files load into the fields those tools read, from
the held-out prompts or a prompts file (dpokit's, AlpacaEval's, Arena-Hard's); bad flags and paths are one line,
exit 2, nothing written; an existing file is kept without --overwrite."""

import json

import pytest

from conftest import run_main, tiny_config
from dpokit.core.config import config_from_dict
from dpokit.core.run import RunDir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dpokit.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("export-answers")
    cfg = tiny_config(tmp, train={"max_steps": 2}, eval={"max_new_tokens": 6})
    return run_training(config_from_dict(cfg)).run_dir


def held_out(run) -> list[str]:
    prompts = []
    for row in RunDir(run).read_eval_pairs():
        if row["prompt"] not in prompts:
            prompts.append(row["prompt"])
    return prompts


def test_alpaca_eval_model_outputs(trained, tmp_path, capfd):
    out = tmp_path / "model_outputs.json"
    res = run_main(capfd, "eval", trained, "--export", "alpaca_eval", out)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and len(rows) == len(held_out(trained)) > 0
    for row in rows:  # exactly what alpaca_eval's model_outputs needs
        assert set(row) == {"instruction", "output", "generator"}
        assert all(isinstance(v, str) for v in row.values())
    assert [r["instruction"] for r in rows] == held_out(trained)
    assert {r["generator"] for r in rows} == {RunDir(trained).path.resolve().name}
    assert not (RunDir(trained).eval_result).exists()  # --export answers only: no evaluation was written


def test_arena_hard_answers_keep_the_question_ids(trained, tmp_path, capfd):
    questions = tmp_path / "question.jsonl"
    asked = [{"question_id": "q-1", "category": "arena-hard-v0.1", "turns": [{"content": "Explain tides."}]},
             {"question_id": "q-2", "category": "arena-hard-v0.1", "turns": [{"content": "Why is the sky blue?"}]}]
    questions.write_text("".join(json.dumps(q) + "\n" for q in asked))
    out = tmp_path / "answers.jsonl"
    res = run_main(capfd, "eval", trained, "--export", "arena_hard", out, "--prompts", questions)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in lines] == ["q-1", "q-2"]
    for a in lines:
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert isinstance(a["answer_id"], str) and a["answer_id"] and isinstance(a["tstamp"], float)
        assert a["choices"][0]["index"] == 0 and isinstance(a["choices"][0]["turns"][0]["content"], str)


def test_prompt_files_dpokit_and_alpaca_eval(trained, tmp_path, capfd):
    from dpokit.eval.answers import read_questions

    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\nExplain tides.\n\nWhy is the sky blue?\n")
    assert [q.instruction for q in read_questions(txt)] == ["Explain tides.", "Why is the sky blue?"]
    evalset = tmp_path / "alpaca_eval.json"
    evalset.write_text(json.dumps([{"instruction": "Name three rivers.", "dataset": "helpful_base"}]))
    out = tmp_path / "outputs.json"
    res = run_main(capfd, "eval", trained, "--export", "alpaca_eval", out, "--prompts", evalset)
    assert res.returncode == 0, res.stderr
    assert [r["instruction"] for r in json.loads(out.read_text())] == ["Name three rivers."]


def one_line_exit_2(res, *words):
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    for word in words:
        assert word in res.stderr, (word, res.stderr)


def test_existing_file_needs_overwrite(trained, tmp_path, capfd):
    out = tmp_path / "model_outputs.json"
    out.write_text("keep me")
    one_line_exit_2(run_main(capfd, "eval", trained, "--export", "alpaca_eval", out), "exists", "--overwrite")
    assert out.read_text() == "keep me"
    res = run_main(capfd, "eval", trained, "--export", "alpaca_eval", out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert isinstance(json.loads(out.read_text()), list)


def test_bad_flags_and_paths_write_nothing(trained, tmp_path, capfd):
    out = tmp_path / "x.json"
    one_line_exit_2(run_main(capfd, "eval", trained, "--export", "alpacaeval", out), "alpacaeval", "alpaca_eval",
                    "arena_hard")
    one_line_exit_2(run_main(capfd, "eval", trained, "--export", "alpaca_eval", out, "--prompts", tmp_path / "no.txt"),
                    "--prompts", "no.txt")
    one_line_exit_2(run_main(capfd, "eval", trained, "--export", "alpaca_eval", tmp_path / "nowhere" / "x.json"),
                    "nowhere", "does not exist")
    one_line_exit_2(run_main(capfd, "eval", tmp_path / "not-a-run", "--export", "alpaca_eval", out),
                    "not a dpokit run folder")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no known field"}) + "\n")
    one_line_exit_2(run_main(capfd, "eval", trained, "--export", "arena_hard", out, "--prompts", bad),
                    "bad.jsonl", "row 1", "instruction")
    one_line_exit_2(run_main(capfd, "eval", trained, "--prompts", bad), "--export")
    one_line_exit_2(run_main(capfd, "eval", trained, "--export", "alpaca_eval"), "--export", "2 arguments")
    assert not out.exists() and not (tmp_path / "nowhere").exists()
