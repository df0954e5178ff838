"""The CLI as a user runs it: a real subprocess."""

import json

import pytest

from conftest import CONFIGS


def test_version_and_help(cli):
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("dpokit ")
    for cmd in (["--help"], ["train", "--help"], ["eval", "--help"], ["config-keys", "--help"]):
        res = cli(*cmd)
        assert res.returncode == 0, res.stderr
        assert "Usage" in res.stdout


def test_bad_config_is_one_line_exit_2(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source: nowhere.jsonl\ntrain:\n  bta: 1\n")
    res = cli("train", bad)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.bta" in lines[0]
    assert "Traceback" not in res.stderr


def test_debug_shows_traceback(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source: x.jsonl\n")
    res = cli("--debug", "train", bad)
    assert res.returncode != 0 and "Traceback" in res.stderr


@pytest.mark.slow
def test_train_then_eval_tiny(cli, tmp_path):
    run = tmp_path / "run"
    res = cli("train", CONFIGS / "tiny.yaml", "--set", f"output.dir={run}")
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("config.yaml", "metrics.jsonl", "model/model.safetensors", "data/eval.jsonl", "eval.json"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(rows[0])
    # The bar: held-out implicit-reward accuracy clearly above chance.
    acc = json.loads((run / "eval.json").read_text())["preference"]["implicit_reward_accuracy"]
    assert acc["value"] >= 0.8 and acc["ci"][0] > 0.5
    # Re-running into the same folder without --overwrite is refused and leaves it intact.
    before = (run / "eval.json").read_bytes()
    again = cli("train", CONFIGS / "tiny.yaml", "--set", f"output.dir={run}")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (run / "eval.json").read_bytes() == before
    res = cli("eval", run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "implicit-reward accuracy" in res.stdout


def test_unknown_command_is_usage_error_not_traceback(cli):
    res = cli("data", "nosuch")
    assert res.returncode == 2 and "No such command" in res.stderr and "Traceback" not in res.stderr
