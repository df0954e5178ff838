"""`dpokit data generate` on the tiny model with the sentiment judge: real sampling, real VADER scores."""

import json

import pytest

from dpokit.data.generate import read_prompts, select_pair
from dpokit.errors import UserError

PROMPTS = ["Describe a rainy Monday.", "What do you think of fresh bread?", "Tell me about the sea.",
           "How was your weekend?", "Review a small bakery.", "Describe a walk in the park.",
           "What do you think of winter?", "Tell me about your neighbors."]


def test_data_generate_pairs_respect_the_gap(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n" + "\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    args = ["data", "generate", "--model", "dpokit-tiny-llama", "--prompts", prompts, "--num-samples", 6,
            "--max-new-tokens", 12, "--judge", "sentiment", "--min-gap", 0.2, "--out", out]
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert 0 < len(rows) <= len(PROMPTS)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    for row in rows:
        # Canonical conversational rows (the tiny model has a chat template).
        assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"] in PROMPTS
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["score_chosen"] >= row["score_rejected"] + 0.2
        # The stored scores are the judge's scores of the stored texts.
        assert row["score_chosen"] == pytest.approx(vader.polarity_scores(chosen)["compound"])
        assert row["score_rejected"] == pytest.approx(vader.polarity_scores(rejected)["compound"])
    # The file loads as preference data.
    from dpokit.config import DataConfig
    from dpokit.data import load_preferences

    data = load_preferences(DataConfig(source=str(out), eval_fraction=0.0))
    assert len(data.train) == len(rows)

    again = cli(*args)  # refused before any model is loaded
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_data_generate_rejects_bad_input(cli, tmp_path):
    missing = cli("data", "generate", "--model", "dpokit-tiny-llama", "--prompts", tmp_path / "nope.txt",
                  "--out", tmp_path / "p.jsonl")
    assert missing.returncode == 2 and "nope.txt" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "p.txt").write_text("Hello\n", encoding="utf-8")
    one = cli("data", "generate", "--model", "dpokit-tiny-llama", "--prompts", tmp_path / "p.txt",
              "--num-samples", 1, "--out", tmp_path / "p.jsonl")
    assert one.returncode == 2 and "at least 2" in one.stderr
    bad_dtype = cli("data", "generate", "--model", "dpokit-tiny-llama", "--prompts", tmp_path / "p.txt",
                    "--dtype", "int8", "--out", tmp_path / "p.jsonl")
    assert bad_dtype.returncode == 2 and "--dtype" in bad_dtype.stderr and "bfloat16" in bad_dtype.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_data_generate_samples_in_bfloat16(cli, tmp_path):
    """bf16 sampling (the quickstart's default on CPUs with native bf16) gives valid, judged pairs; the command
    reports the dtype of the model that actually sampled."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS), encoding="utf-8")
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / f"{dtype}.jsonl"
        res = cli("data", "generate", "--model", "dpokit-tiny-llama", "--prompts", prompts, "--num-samples", 4,
                  "--max-new-tokens", 8, "--min-gap", 0.0, "--dtype", dtype, "--out", out)
        assert res.returncode == 0, res.stderr
        assert f"sampled in {dtype}" in res.stdout
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert rows and all(r["score_chosen"] > r["score_rejected"] for r in rows)



def test_sampling_dtype_follows_the_cpu_flags(monkeypatch):
    import torch

    from dpokit.models import cpu_has_native_bf16, pick_sampling_dtype

    amx = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n"
    avx512_bf16 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
    plain = "flags\t\t: fpu sse avx2 avx512f avx512bw\nmodel name\t: amx_bf16 in a name is not a flag\n"
    assert cpu_has_native_bf16(amx) and cpu_has_native_bf16(avx512_bf16)
    assert not cpu_has_native_bf16(plain) and not cpu_has_native_bf16("")
    assert pick_sampling_dtype("float16") == "float16"  # explicit choices pass through
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_sampling_dtype("auto") == ("bfloat16" if cpu_has_native_bf16() else "float32")


def test_read_prompts_jsonl_and_bundled(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Hi there"}\n{"prompt": [{"role": "user", "content": "Hello"}]}\n', encoding="utf-8")
    assert read_prompts(path) == ["Hi there", [{"role": "user", "content": "Hello"}]]
    path.write_text('{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="p.jsonl:1"):
        read_prompts(path)
    bundled = read_prompts(None)
    assert len(bundled) >= 300 and len(set(bundled)) == len(bundled)


def test_select_pair_best_vs_worst_and_ties():
    pair = select_pair("Q", ["ok", "great", "awful"], [0.1, 0.9, -0.5], min_gap=0.3)
    assert pair["chosen"] == " great" and pair["rejected"] == " awful"
    assert select_pair("Q", ["a", "b"], [0.2, 0.2], min_gap=0.0) is None  # tie dropped
    assert select_pair("Q", ["a", "b"], [0.2, 0.25], min_gap=0.1) is None  # gap too small
    assert select_pair("Q", ["", "b"], [0.9, 0.1], min_gap=0.0) is None  # empty answers do not count
