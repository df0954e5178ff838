"""`dpokit data generate` on the tiny model with the sentiment judge: real sampling, real VADER scores."""

import json

import pytest

from dpokit.core.config import PairsConfig
from dpokit.core.errors import UserError
from dpokit.data.generate import generate_pairs, read_prompts, select_pair, settings_key

PROMPTS = ["Describe a rainy Monday.", "What do you think of fresh bread?", "Tell me about the sea.",
           "How was your weekend?", "Review a small bakery.", "Describe a walk in the park.",
           "What do you think of winter?", "Tell me about your neighbors."]


@pytest.mark.slow
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
    from dpokit.core.config import DataConfig
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
    assert one.returncode == 2 and "pairs.num_samples (--num-samples)" in one.stderr and "2" in one.stderr
    bad_dtype = cli("data", "generate", "--model", "dpokit-tiny-llama", "--prompts", tmp_path / "p.txt",
                    "--dtype", "int8", "--out", tmp_path / "p.jsonl")
    assert bad_dtype.returncode == 2 and "--dtype" in bad_dtype.stderr and "bfloat16" in bad_dtype.stderr
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.slow  # SmolLM2 conversion and sampling (about 20 s)
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


@pytest.mark.slow
def test_data_generate_takes_the_pairs_section(cli, tmp_path):
    """--set pairs.KEY=VALUE and --config's pairs section drive the command; flags and --set override the file."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS), encoding="utf-8")
    out = tmp_path / "set.jsonl"
    res = cli("data", "generate", "--model", "dpokit-tiny-llama", "--set", f"pairs.prompts={prompts}",
              "--set", "pairs.num_samples=3", "--set", "pairs.max_new_tokens=8", "--set", "pairs.min_gap=0.0",
              "--set", "pairs.dtype=float32", "--set", "pairs.num_prompts=5", "--out", out)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert 0 < len(rows) <= 5 and "from 5 prompts" in res.stdout and "sampled in float32" in res.stdout
    assert all(r["prompt"][0]["content"] in PROMPTS for r in rows)

    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name_or_path: dpokit-tiny-llama\ndata:\n  system_prompt: Be brief.\n"
                      f"pairs:\n  prompts: {prompts}\n  num_samples: 1\n  max_new_tokens: 12\n  min_gap: 0.0\n"
                      "train:\n  beta: 0.2\n", encoding="utf-8")
    bad = cli("data", "generate", "--config", config, "--out", tmp_path / "bad.jsonl")
    assert bad.returncode == 2 and "pairs.num_samples" in bad.stderr and str(config) in bad.stderr
    out = tmp_path / "config.jsonl"
    res = cli("data", "generate", "--config", config, "--num-samples", 6, "--out", out)  # the flag wins
    assert res.returncode == 0, res.stderr
    assert f"from {len(PROMPTS)} prompts" in res.stdout and out.is_file()


@pytest.mark.parametrize("args, named", [
    (["--num-samples", "1"], "pairs.num_samples (--num-samples)"),
    (["--top-p", "1.5"], "pairs.top_p (--top-p)"),
    (["--set", "pairs.nope=1"], "pairs.nope"),
    (["--set", "pairs.temperature=hot"], "pairs.temperature"),
    (["--set", "train.beta=1"], "train.beta"),
    (["--set", "num_samples=3"], "num_samples"),
    (["--set", "pairs.eval_prompts=3"], "pairs.eval_prompts"),
])
def test_data_generate_bad_settings_are_one_line_before_any_model_loads(cli, tmp_path, args, named):
    # A model folder that does not exist: the settings must be refused before anything tries to load it.
    res = cli("data", "generate", "--model", tmp_path / "no-model", *args, "--out", tmp_path / "p.jsonl")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], res.stderr
    assert "no-model" not in lines[0] and not (tmp_path / "p.jsonl").exists()


def test_data_generate_flags_are_the_pairs_keys():
    """Each pairs flag's help is its PairsConfig description and it defaults to None (= not given), so the
    config's defaults apply: no second copy of either."""
    from typer.main import get_command

    from dpokit.cli import app

    generate = get_command(app).commands["data"].commands["generate"]
    params = {p.name: p for p in generate.params}
    flags = ["prompts", "num_samples", "max_new_tokens", "temperature", "top_p", "judge", "min_gap", "seed",
             "batch_size", "dtype"]
    for key in flags:
        assert params[key].opts == ["--" + key.replace("_", "-")]
        assert params[key].help == PairsConfig.model_fields[key].description, key
        assert params[key].default is None, key
    assert {"set_", "config", "model", "out", "overwrite"} <= set(params)


def test_settings_key_covers_what_changes_the_pairs():
    base = PairsConfig()

    def key(cfg=base, system_prompt=None, dtype="float32", prompts=("a", "b")):
        return settings_key("m", list(prompts), cfg, system_prompt=system_prompt, dtype=dtype)

    changed = [PairsConfig(num_samples=5), PairsConfig(max_new_tokens=9), PairsConfig(temperature=0.7),
               PairsConfig(top_p=0.9), PairsConfig(judge="python"), PairsConfig(judge_options={"model": "x"}),
               PairsConfig(min_gap=0.3), PairsConfig(batch_size=8), PairsConfig(seed=1)]
    keys = {key(cfg) for cfg in changed} | {key(), key(system_prompt="Be brief."), key(dtype="bfloat16"),
                                            key(prompts=("a", "c"))}
    assert len(keys) == len(changed) + 4
    # What only picks the prompts is covered by the prompts themselves.
    assert key(PairsConfig(prompts="p.txt", num_prompts=5, eval_prompts=3)) == key()
    # "auto" is resolved: the key names the dtype that samples.
    from dpokit.core.models import pick_sampling_dtype

    assert key(dtype="auto") == key(dtype=pick_sampling_dtype("auto"))


def test_generate_pairs_takes_the_pairs_config(tiny_llama):
    model, tokenizer = tiny_llama
    cfg = PairsConfig(num_samples=3, max_new_tokens=6, min_gap=0.0, seed=3)
    pairs, stats = generate_pairs(model, tokenizer, PROMPTS[:4], cfg, dtype="float32")
    again, _ = generate_pairs(model, tokenizer, PROMPTS[:4], cfg, dtype="float32")
    assert pairs == again  # seeded
    assert stats["prompts"] == 4 and stats["samples"] == 12 and stats["dtype"] == "float32"
    assert stats["pairs"] == len(pairs) and all(p["score_chosen"] > p["score_rejected"] for p in pairs)


def test_sampling_dtype_follows_the_cpu_flags(monkeypatch):
    import torch

    from dpokit.core.models import cpu_has_native_bf16, pick_sampling_dtype

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
