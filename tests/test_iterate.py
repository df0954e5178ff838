"""dpokit iterate (issue 14): rounds of sample -> judge -> train on the tiny model, with a python judge (answer length
in characters) so the tiny model's garbage text still gives clear pairs.

Must-show 1: the rounds use disjoint prompts; the right reference is used (the step-0 ln 2 check passes in round 1,
and with `previous` the reference log-probs are the previous round's policy's); a run stopped between rounds
continues with the next round, and one killed inside a round resumes from the round's checkpoint. Must-show 3: bad
input ends with one line and exit 2 before anything is written. The train layer's `train.lora.init_from` is tested
here too: which reference each setting gives when training continues an adapter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from transformers import TrainerCallback

from conftest import CONFIGS, ROOT, run_main, tiny_config
from dpokit.core.config import config_from_dict
from dpokit.core.io import read_jsonl

PROMPTS = (ROOT / "src" / "dpokit" / "assets" / "quickstart_prompts.txt").read_text().splitlines()


class Crash(TrainerCallback):
    """Raises at the end of optimizer step `step`, before that step's checkpoint is saved: a process killed there."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise RuntimeError(f"killed at step {state.global_step}")


def _judge(tmp_path) -> str:
    (tmp_path / "judge.py").write_text("def score(prompt, response):\n    return float(len(response))\n")
    return f"{tmp_path / 'judge.py'}:score"


def _config(tmp_path, **iterate) -> str:
    """An iterate config on the tiny model: 6 held-out prompts, 6 prompts a round, 4 answers of 8 tokens each."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:30]) + "\n")
    judge = {"judge": "python", "judge_options": {"function": _judge(tmp_path)}}
    cfg = {
        "model": {"name_or_path": "dpokit-tiny-llama"},
        "iterate": {"rounds": 2, "prompts_per_round": 6, "reference": "previous", "learning_rate": 3e-3,
                    "epochs": 1, **iterate},
        "pairs": {"prompts": str(tmp_path / "prompts.txt"), "eval_prompts": 6, "num_samples": 4,
                  "max_new_tokens": 8, "min_gap": 0.5, **judge},
        "data": {"max_length": 64},
        "train": {"batch_size": 4, "save_steps": 1, "save_total_limit": 3, "lora": {"r": 4, "alpha": 8}},
        "eval": {"num_prompts": 6, "max_new_tokens": 8, **judge},
    }
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _prompts(path) -> set[str]:
    return {json.dumps(row["prompt"], sort_keys=True) for row in read_jsonl(path)}


def _policy_logps(run_dir, adapter=None):
    """Log-probs of run_dir's training pairs under pi0, or pi0 + `adapter`, scored as training scores them."""
    from peft import PeftModel

    from dpokit.core.models import load_model_and_tokenizer
    from dpokit.core.run import RunDir
    from dpokit.core.scoring import pair_logps
    from dpokit.core.templates import setup_chat_template
    from dpokit.data.encode import encode_rows

    run = RunDir(run_dir)
    cfg = run.read_config()
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    setup_chat_template(tokenizer, cfg.data.chat_template)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    encoded, _ = encode_rows(run.read_train_pairs(), tokenizer, cfg.data, origin="test")
    res = pair_logps(model.eval(), encoded, tokenizer.pad_token_id, 8, cfg.train.packed)
    return torch.tensor([[c, r] for c, r in zip(res["chosen"], res["rejected"], strict=True)])


@pytest.mark.slow
def test_iterate_rounds_resume_and_offline_arm(tmp_path):
    """One test, so the runs are shared: 2 rounds; then 3 (stopped between rounds 2 and 3), killed inside round 3;
    then resumed, with the offline arm."""
    from dpokit.iterate import run_iterate

    config, out = _config(tmp_path), tmp_path / "out"
    first = run_iterate(out, config=config)
    assert [r["round"] for r in first["rounds"]] == [1, 2]
    # The outcome of the last round against pi0 leads the summary, its table and iterate.html.
    from dpokit.iterate import format_table

    assert first["outcome"] in ("better", "no_change", "worse")
    assert first["verdict"].startswith("Last round vs pi0: ") and format_table(first).splitlines()[0] == first["verdict"]
    assert "lc_win_rate_vs_initial" in first["rounds"][1]
    assert (out / "iterate.html").read_text().split("<body>", 1)[1].startswith('<p id="verdict"')

    # Disjoint prompts: every round's training prompts, and the held-out prompts, share none.
    held = _prompts(out / "pairs" / "eval.jsonl")
    rounds = [_prompts(out / f"round-{k}" / "data" / "train.jsonl") for k in (1, 2)]
    assert rounds[0] and rounds[1] and held
    assert not rounds[0] & rounds[1] and not (rounds[0] | rounds[1]) & held
    assert all(_prompts(out / f"round-{k}" / "data" / "eval.jsonl") == held for k in (1, 2))

    # The reference: round 1 starts at pi0 (ln 2 at step 0); in round 2 (`previous`) the reference log-probs are
    # those of the policy round 1 left, not pi0's, and the step-0 check passes again.
    summaries = [json.loads((out / f"round-{k}" / "train_summary.json").read_text()) for k in (1, 2)]
    for s in summaries:
        assert s["reference"] == "precomputed" and s["step0_check"]["policy_equals_reference"], s["step0_check"]
    cached = torch.tensor(json.loads(open(summaries[1]["reference_cache"]["path"]).read())["train"])
    previous = _policy_logps(out / "round-2", adapter=out / "round-1" / "model")
    pi0 = _policy_logps(out / "round-2")
    assert torch.allclose(cached, previous, atol=1e-4, rtol=0)
    assert (cached - pi0).abs().max() > 1e-3  # round 1 moved the policy: the check above can tell them apart

    # Stopped between rounds 2 and 3 (a third round asked for), then killed in round 3 after its checkpoint-1.
    finished = {k: summaries[k - 1]["finished"] for k in (1, 2)}
    with pytest.raises(RuntimeError, match="killed at step 2"):
        run_iterate(out, config=config, overrides=["iterate.rounds=3"], callbacks={"round-3": [Crash(2)]})
    assert (out / "round-3" / "checkpoints" / "checkpoint-1").is_dir() and not (out / "round-3" / "model").exists()
    assert [r["round"] for r in json.loads((out / "iterate.json").read_text())["rounds"]] == [1, 2]

    final = run_iterate(out, config=config, overrides=["iterate.rounds=3", "iterate.compare_offline=true"])
    assert [r["round"] for r in final["rounds"]] == [1, 2, 3]
    assert final["rounds"][:2] == first["rounds"]  # rounds 1 and 2 were kept, not redone
    for k in (1, 2):
        assert json.loads((out / f"round-{k}" / "train_summary.json").read_text())["finished"] == finished[k]
    third = final["rounds"][2]
    assert third["resumed_from"] == "checkpoint-1" and third["steps"] == 2
    assert not _prompts(out / "round-3" / "data" / "train.jsonl") & (rounds[0] | rounds[1] | held)

    for row in final["rounds"] + [final["offline"]]:
        for key in ("win_rate_vs_initial", "kl_from_initial", "mean_score", "distinct_2", "mean_length"):
            assert math.isfinite(row[key]), (row["round"], key)
        low, high = row["win_rate_vs_initial_ci"]
        assert low <= row["win_rate_vs_initial"] <= high and row["pairs"] > 0 and row["seconds"] >= 0
    # Every round answered the same held-out prompts with the same seeds: pi0's answers are the same each time.
    base = [[row["base"] for row in read_jsonl(out / name / "eval_samples.jsonl")]
            for name in ("round-1", "round-2", "round-3", "offline")]
    assert base[0] and all(b == base[0] for b in base)
    # Round 1's "previous" is pi0: the same comparison as its win rate against its base answers.
    assert final["rounds"][0]["win_rate_vs_previous"] == final["rounds"][0]["win_rate_vs_initial"]
    assert all(0 <= r["win_rate_vs_previous"] <= 1 for r in final["rounds"])

    # The offline arm: pi0's pairs on all three rounds' prompts, trained for the rounds' total steps.
    offline = final["offline"]
    assert offline["steps"] == sum(r["steps"] for r in final["rounds"]) and offline["win_rate_vs_previous"] is None
    assert _prompts(out / "offline" / "data" / "train.jsonl") <= rounds[0] | rounds[1] | _prompts(
        out / "round-3" / "data" / "train.jsonl")
    off_cfg = yaml.safe_load((out / "offline" / "config.yaml").read_text())
    assert off_cfg["train"]["lora"]["init_from"] is None and off_cfg["train"]["max_steps"] == offline["steps"]
    assert 0 <= final["last_round_vs_offline"]["win_rate"] <= 1
    html = (out / "iterate.html").read_text()
    assert "round 3" in html and "offline" in html and html.count("data:image/png;base64,") == 2


def test_round_configs_continue_one_adapter(tmp_path):
    """`initial` (the default): every round's reference is pi0, the base under the disabled adapter; round K
    continues round K-1's adapter with the per-round learning rate and epochs; sft_weight reaches the loss."""
    from dpokit.iterate import load_iterate_config, plan_iterate, round_config

    cfg = load_iterate_config(_config(tmp_path, reference="initial", sft_weight=0.5))
    iteration = plan_iterate(cfg, tmp_path / "out")
    adapter = tmp_path / "out" / "round-1" / "model"
    second = round_config(iteration, 2, init_from=adapter)
    assert second.train.reference == "adapter" and second.train.lora.init_from == str(adapter.resolve())
    assert second.train.learning_rate == 3e-3 and second.train.epochs == 1 and second.train.sft_weight == 0.5
    assert second.data.source.endswith("pairs/round-2.jsonl") and second.output.dir.endswith("round-2")
    assert [len(c) for c in iteration.chunks] == [6, 6]


def _train_tiny(tmp_path, name, **train):
    from dpokit.train.trainer import run_training

    cfg = config_from_dict(tiny_config(tmp_path, output={"dir": str(tmp_path / name)}, eval={"enabled": False},
                                       data={"max_rows": 16, "max_eval_rows": 4},
                                       train={"batch_size": 16, "lora": {"r": 4, "alpha": 8}, **train}))
    run_training(cfg)
    return tmp_path / name


@pytest.mark.slow
def test_lora_init_from_reference_at_the_train_layer(tmp_path):
    """train.lora.init_from continues an adapter. With reference: precomputed the reference is the policy as loaded
    (step 0: ln 2, and the cached log-probs are that policy's); with reference: adapter it is still pi0, so step 0
    is not ln 2, and the step-0 rewards say the reference log-probs are pi0's. One step of 16 pairs (one batch):
    the metrics logged at step 1 are the step-0 forward's, over every pair."""
    first = _train_tiny(tmp_path, "first", learning_rate=1e-2, max_steps=3, batch_size=4)
    adapter = first / "model"
    previous = _train_tiny(tmp_path, "previous", learning_rate=1e-3, max_steps=1, reference="precomputed",
                           lora={"r": 4, "alpha": 8, "init_from": str(adapter)})
    summary = json.loads((previous / "train_summary.json").read_text())
    assert summary["step0_check"]["policy_equals_reference"], summary["step0_check"]
    cached = torch.tensor(json.loads(open(summary["reference_cache"]["path"]).read())["train"])
    assert torch.allclose(cached, _policy_logps(previous, adapter), atol=1e-4, rtol=0)
    assert (cached - _policy_logps(previous)).abs().max() > 1e-3

    # The reference cache key sees the adapter's weights: two adapters on the same base never share cached values.
    from peft import PeftModel

    from dpokit.core.models import fingerprint_model, load_model

    fingerprints = {fingerprint_model(PeftModel.from_pretrained(load_model("dpokit-tiny-llama", dtype="float32"),
                                                                str(a))) for a in (adapter, previous / "model")}
    assert len(fingerprints) == 2

    initial = _train_tiny(tmp_path, "initial", learning_rate=1e-3, max_steps=1, reference="adapter",
                          lora={"r": 4, "alpha": 8, "init_from": str(adapter)})
    summary = json.loads((initial / "train_summary.json").read_text())
    assert not summary["step0_check"]["policy_equals_reference"]
    assert abs(summary["step0_check"]["sigmoid_loss"] - math.log(2)) > 1e-3
    row = next(r for r in read_jsonl(initial / "metrics.jsonl") if r.get("step") == 1 and "loss" in r)
    pi0 = _policy_logps(initial).mean(0)
    ref_chosen = row["logps/chosen"] - row["rewards/chosen"] / 0.1  # reward = beta (policy - reference)
    ref_rejected = row["logps/rejected"] - row["rewards/rejected"] / 0.1
    assert ref_chosen == pytest.approx(pi0[0].item(), abs=1e-3)
    assert ref_rejected == pytest.approx(pi0[1].item(), abs=1e-3)
    # The loaded adapter is what training continued: the policy at step 0 is pi0 + adapter, not a fresh adapter.
    assert row["logps/chosen"] == pytest.approx(_policy_logps(initial, adapter)[:, 0].mean().item(), abs=1e-3)


def test_shipped_iterate_config_is_valid_and_packaged(tmp_path):
    from dpokit.iterate import default_config_path, load_iterate_config, plan_iterate

    assert default_config_path() == CONFIGS / "iterate.yaml"
    packaged = ROOT / "src" / "dpokit" / "assets" / "iterate.yaml"
    assert packaged.read_text() == (CONFIGS / "iterate.yaml").read_text(), "copy configs/iterate.yaml to assets"
    cfg = load_iterate_config(None)
    assert cfg.model.name_or_path == "smollm2-135m-instruct" and cfg.train.lora is not None
    assert cfg.pairs.judge == cfg.eval.judge == "sentiment" and cfg.iterate.reference == "initial"
    # Round 1 takes less than half of quickstart's learning rate x steps, on pairs from fewer answers per prompt, so
    # it leaves the judge room for rounds 2 and 3 (docs/iterate.md; measured: round 1 won 0.74, quickstart 0.99).
    from dpokit.quickstart import load_quickstart_config

    qs = load_quickstart_config(None)
    round_steps = cfg.iterate.prompts_per_round / cfg.train.batch_size * cfg.iterate.epochs
    qs_steps = (qs.pairs.num_prompts - qs.pairs.eval_prompts) / qs.train.batch_size * qs.train.epochs
    assert round_steps * cfg.iterate.learning_rate < 0.5 * qs_steps * qs.train.learning_rate
    assert cfg.pairs.num_samples < qs.pairs.num_samples
    iteration = plan_iterate(cfg, tmp_path / "out")  # no weights: prompts, chunks, folders, the round plan
    sizes = [len(c) for c in iteration.chunks]
    assert len(sizes) == cfg.iterate.rounds and len(set(sizes)) == 1 and len(iteration.held) == cfg.pairs.eval_prompts


def test_shipped_tiny_iterate_config_plans_from_the_repository_root(monkeypatch, tmp_path):
    """configs/tiny-iterate.yaml (the README's runnable example) names its judge relative to the repository root."""
    from dpokit.iterate import load_iterate_config, plan_iterate

    monkeypatch.chdir(ROOT)
    iteration = plan_iterate(load_iterate_config(CONFIGS / "tiny-iterate.yaml"), tmp_path / "out")
    assert [len(c) for c in iteration.chunks] == [12, 12] and len(iteration.held) == 12


@pytest.mark.parametrize("case", ["rounds", "set_rounds", "too_many_prompts", "foreign_round", "foreign_out",
                                  "full_finetune"])
def test_bad_input_is_one_line_exit_2_before_any_work(tmp_path, capfd, case):
    config, out = _config(tmp_path), tmp_path / "out"
    args, expect = ["iterate", "--config", config, "--out", out], None
    if case == "rounds":
        args += ["--rounds", "0"]
        expect = "--rounds: 0; give 1 or more rounds"
    elif case == "set_rounds":
        args += ["--set", "iterate.rounds=0"]
        expect = "iterate.rounds=0: Input should be greater than or equal to 1"
    elif case == "too_many_prompts":
        args += ["--set", "iterate.prompts_per_round=10", "--rounds", "3"]  # 30 prompts, 6 held out
        expect = "3 rounds x 10 prompts need 30 training prompts, but there are 24"
    elif case == "foreign_round":
        (out / "round-2").mkdir(parents=True)
        (out / ".dpokit-iterate").touch()
        (out / "round-2" / "notes.txt").write_text("mine")
        expect = "round-2 is not a dpokit run folder (no config.yaml and run.json); move it away"
    elif case == "foreign_out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expect = "exists and was not written by dpokit iterate; choose another --out"
    elif case == "full_finetune":
        raw = yaml.safe_load(open(config))
        del raw["train"]["lora"]
        open(config, "w").write(yaml.safe_dump(raw))
        expect = "iterate supports LoRA runs (train.lora)"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = run_main(capfd, *args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert expect in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.slow
def test_cli_killed_with_sigkill_after_round_1_continues(tmp_path):
    """The real thing: `dpokit iterate` killed (SIGKILL, no cleanup) as soon as iterate.json lists round 1, i.e.
    somewhere in round 2; the same command again keeps round 1 and finishes round 2."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config, out = _config(tmp_path), tmp_path / "out"
    argv = [sys.executable, "-m", "dpokit", "iterate", "--config", config, "--out", str(out), "-q"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = out / "iterate.json"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if summary.is_file() and json.loads(summary.read_text())["rounds"]:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed between rounds"
    finished = json.loads((out / "round-1" / "train_summary.json").read_text())["finished"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rounds = json.loads(summary.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert json.loads((out / "round-1" / "train_summary.json").read_text())["finished"] == finished
    assert "round 1" in res.stdout and "round 2" in res.stdout
