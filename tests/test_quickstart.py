"""dpokit quickstart: the shipped config is valid; the whole pipeline runs on the tiny model (slow)."""

import json
import math

import pytest

from conftest import CONFIGS, ROOT

SUMMARY_KEYS = ("win_rate", "win_rate_ci", "mean_score_base", "mean_score_tuned", "implicit_reward_accuracy", "kl",
                "wall_seconds")


def test_shipped_quickstart_config_is_valid_and_packaged():
    from dpokit.quickstart import default_config_path, load_quickstart_config

    assert default_config_path() == CONFIGS / "quickstart.yaml"
    packaged = ROOT / "src" / "dpokit" / "assets" / "quickstart.yaml"
    assert packaged.read_text() == (CONFIGS / "quickstart.yaml").read_text(), "copy configs/quickstart.yaml to assets"
    cfg = load_quickstart_config(None)
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.train.lora is not None and cfg.pairs.judge == cfg.eval.judge == "sentiment"
    assert cfg.eval.num_prompts >= 60 and cfg.pairs.eval_prompts >= 60


@pytest.mark.slow
def test_quickstart_refuses_data_source_and_foreign_out_dir(cli, tmp_path):
    cfg = tmp_path / "qs.yaml"
    cfg.write_text("data:\n  source: pairs.jsonl\n", encoding="utf-8")
    res = cli("quickstart", "--config", cfg, "--out", tmp_path / "out")
    assert res.returncode == 2 and "data.source" in res.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me", encoding="utf-8")
    res = cli("quickstart", "--out", foreign)
    assert res.returncode == 2 and "not written by dpokit quickstart" in res.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_quickstart_pipeline_on_tiny_model(cli, tmp_path):
    prompts = (ROOT / "src" / "dpokit" / "assets" / "quickstart_prompts.txt").read_text().splitlines()[:60]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    cfg = tmp_path / "qs.yaml"
    cfg.write_text(f"""
model: {{name_or_path: dpokit-tiny-llama}}
pairs: {{prompts: {tmp_path / 'prompts.txt'}, eval_prompts: 16, num_samples: 6, max_new_tokens: 16, min_gap: 0.05}}
data: {{max_length: 96}}
train: {{learning_rate: 1.0e-3, epochs: 2, batch_size: 8, reference: precomputed, lora: {{r: 8, alpha: 16}}}}
eval: {{num_prompts: 16, max_new_tokens: 16}}
""", encoding="utf-8")
    out = tmp_path / "qs"
    res = cli("quickstart", "--out", out, "--config", cfg, env={"DPOKIT_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert summary[key] is not None, key
    assert 0.0 <= summary["win_rate"] <= 1.0
    low, high = summary["win_rate_ci"]
    assert low <= summary["win_rate"] <= high
    assert 0.0 <= summary["implicit_reward_accuracy"] <= 1.0 and math.isfinite(summary["kl"])
    assert summary["train_pairs"] > 0 and summary["eval_pairs"] > 0
    assert set(summary["stage_seconds"]) == {"pairs", "train", "eval", "report"}
    report = out / "run" / "report.html"
    assert summary["report"] == str(report) and report.stat().st_size > 1000
    assert "win rate" in res.stdout
    # The outcome leads: summary.json's verdict, and the first line of the printed summary.
    assert summary["outcome"] in ("better", "no_change", "worse") and summary["verdict"].split(":")[0] in (
        "Better", "No measurable change", "Worse")
    assert summary["verdict"][:40] in res.stdout and "length-controlled win rate" in res.stdout
    printed = res.stdout.splitlines()
    assert any(line.startswith(summary["verdict"][:40]) for line in printed)
    assert printed.index(next(line for line in printed if line.startswith(summary["verdict"][:40]))) < \
        printed.index(next(line for line in printed if "win rate, tuned vs base" in line))
    assert summary["lc_win_rate_ci"] is None or summary["lc_win_rate_ci"][0] <= summary["lc_win_rate"]
    pairs = [json.loads(line) for line in (out / "pairs" / "train.jsonl").read_text().splitlines()]
    assert all(p["score_chosen"] >= p["score_rejected"] + 0.05 for p in pairs)
    # Held-out prompts never appear in training pairs.
    held = {json.dumps(json.loads(line)["prompt"]) for line in (out / "pairs" / "eval.jsonl").read_text().splitlines()}
    assert not held & {json.dumps(p["prompt"]) for p in pairs}

    again = cli("quickstart", "--out", out, "--config", cfg, env={"DPOKIT_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing cached pairs" in again.stdout and "reusing the finished run" in again.stdout
    fresh = cli("quickstart", "--out", out, "--config", cfg, "--fresh", env={"DPOKIT_CACHE": str(tmp_path / "cache")})
    assert fresh.returncode == 0 and "reusing" not in fresh.stdout
    # --fresh recomputes the reference log-probs too, though the cache holds them for these very pairs.
    train_summary = json.loads((out / "run" / "train_summary.json").read_text())
    assert train_summary["reference_cache"]["cache"] == "miss" and train_summary["reference_cache"]["forwards"] > 0
