"""`dpokit doctor`: each rule on hand-written curves and evaluations (pure functions, no training), then real tiny
runs broken on purpose (learning rate far too low, far too high, too many epochs) flag the intended finding and a
healthy run flags none; the CLI's JSON and errors; the report's verdict rendered in headless Chromium."""

import html
import json
import math
import re
import shutil
import subprocess
import sys

import pytest

from conftest import tiny_config
from dpokit.core.config import TrainConfig, config_from_dict
from dpokit.core.run import EvalResult, EvalSample, MetricsRow, RunDir
from dpokit.eval import doctor
from dpokit.eval.doctor import RunArtifacts, diagnose, run_rules, verdict
from dpokit.eval.metrics import kl_summary, length_buckets, length_summary, outcome_summary
from test_report import CHROMIUM, CHROMIUM_FLAGS

LN2 = math.log(2)


# --- hand-written artifacts --------------------------------------------------------------------------------------

def rows(n=12, loss=None, acc=None, margin=None, chosen=None, rejected=None, **extra):
    """n training rows; each argument is a function of the step (1..n) giving that metric."""
    out = []
    for step in range(1, n + 1):
        row = {"step": step, "loss": loss(step) if loss else 0.5, "learning_rate": 1e-6}
        for key, fn in (("rewards/accuracies", acc), ("rewards/margins", margin), ("rewards/chosen", chosen),
                        ("rewards/rejected", rejected), *extra.items()):
            if fn is not None:
                row[key] = fn(step)
        out.append(MetricsRow.model_validate(row))
    return out


HEALTHY = dict(loss=lambda s: LN2 - 0.02 * s, acc=lambda s: min(0.5 + 0.03 * s, 0.8), margin=lambda s: 0.05 * s,
               chosen=lambda s: -0.005 * s, rejected=lambda s: -0.06 * s)


def evaluation(*, accuracy=(40, 48), outcomes=None, len_base=None, len_tuned=None, kl_per_answer=1.0, tokens=20,
               scores=None):
    """An EvalResult built with the same metric functions `dpokit eval` uses."""
    k, n = accuracy
    outcomes = outcomes if outcomes is not None else [1, 0, -1, 1] * 3
    len_base = len_base or [20] * len(outcomes)
    len_tuned = len_tuned or [20] * len(outcomes)
    acc = outcome_summary([1] * k + [-1] * (n - k)).win
    gen = {"n_prompts": len(outcomes), "samples_per_prompt": 1, "n_samples": len(outcomes),
           "decoding": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 0},
           "judge": {"name": "python", "kind": "pointwise", "details": {}}, "outcomes": outcome_summary(outcomes),
           "scores": scores, "lengths": length_summary(base=len_base, tuned=len_tuned),
           "length_controlled": {"tolerance": 0.1, "regression": None,
                                 "buckets": length_buckets(outcomes, len_tuned, len_base, 0.1)}}
    kl = kl_summary([kl_per_answer + 0.1 * (i % 3) for i in range(len(outcomes))], [0.0] * len(outcomes),
                    [tokens] * len(outcomes), exact_sampling=True)
    return EvalResult.model_validate({
        "run_dir": "x", "model": "m", "beta": 0.1,
        "preference": {"n_pairs": n, "implicit_reward_accuracy": acc, "reward_margin": {"value": 0.5, "ci": [0.4, 0.6]},
                       "likelihood_accuracy": {}},
        "generation": gen, "kl": kl})


def artifacts(metrics, eval_result=None, samples=None, beta=0.1, reference="model"):
    return RunArtifacts(metrics=metrics, beta=beta, reference=reference, eval=eval_result, samples=samples or [])


def ids(findings, severity="warning"):
    return {f.id for f in findings if f.severity == severity}


# --- each rule on its own ----------------------------------------------------------------------------------------

def test_healthy_curves_flag_nothing():
    answers = [f"the sea was calm and bright on day {i}" for i in range(6)]
    won = evaluation(outcomes=[1] * 10 + [0, -1])
    findings = run_rules(artifacts(rows(**HEALTHY), won, _samples(answers, answers)))
    assert findings == []
    assert verdict(findings, won).startswith("Better: the tuned model beat the base by the judge python on 12 "
                                             "answers: win rate 0.88")


def test_loss_stuck_at_ln2():
    stuck = rows(loss=lambda s: LN2 + 1e-4 * (-1) ** s, margin=lambda s: 1e-4, acc=lambda s: 0.5)
    found = doctor.loss_stuck_at_ln2(artifacts(stuck))
    assert found.id == "loss_stuck_at_ln2" and found.numbers["steps"] == [10, 12]
    assert "learning_rate" in " ".join(found.what_to_try) and "#1311" in found.source
    assert doctor.loss_stuck_at_ln2(artifacts(rows(**HEALTHY))) is None
    # The loss sits at ln 2 but the margin moves: a loss that is not the sigmoid one, not stuck.
    assert doctor.loss_stuck_at_ln2(artifacts(rows(loss=lambda s: LN2, margin=lambda s: 0.5))) is None
    # Too few rows to judge: a 3-step run is at ln 2 by design.
    assert doctor.loss_stuck_at_ln2(artifacts(rows(n=3, loss=lambda s: LN2, margin=lambda s: 0.0))) is None


def test_reward_accuracy_saturated():
    exploding = rows(n=20, loss=lambda s: 0.01, acc=lambda s: 1.0, margin=lambda s: 0.5 * s)
    found = doctor.reward_accuracy_saturated(artifacts(exploding, evaluation(accuracy=(48, 48))))
    assert found.numbers["tail_margin"] == pytest.approx(0.5 * (16 + 17 + 18 + 19 + 20) / 5)  # the last quarter
    assert found.numbers["margin_first_over_threshold_step"] == 4 and found.numbers["heldout_accuracy"] == 1.0
    assert {"raise train.beta", "lower train.learning_rate"} <= set(found.what_to_try)
    assert any("ipo" in t for t in found.what_to_try) and "Azar" in found.source
    # Every pair right but by a modest margin (an easy data set) is not saturation; nor a large margin at 0.8.
    assert doctor.reward_accuracy_saturated(artifacts(rows(acc=lambda s: 1.0, margin=lambda s: 0.6))) is None
    assert doctor.reward_accuracy_saturated(artifacts(rows(acc=lambda s: 0.8, margin=lambda s: 5.0))) is None


def test_chosen_logps_falling_normal_vs_harmful():
    falling = dict(chosen=lambda s: -0.02 * s, rejected=lambda s: -0.2 * s)  # beta 0.1: -2.4 vs -24 nats at the end
    normal = doctor.chosen_logps_falling(artifacts(rows(**falling), evaluation()))
    assert normal.severity == "info" and "did not get worse" in normal.evidence
    assert normal.numbers["tail_chosen_logratio_nats"] == pytest.approx(-0.02 * 11 / 0.1)
    # Both fall and the answers lose to the base's: harmful, and the fix names a real train option.
    losing = evaluation(outcomes=[-1] * 10 + [0, 1])
    harmful = doctor.chosen_logps_falling(artifacts(rows(**falling), losing))
    assert harmful.severity == "warning" and "win rate" in harmful.evidence
    keys = set(re.findall(r"train\.(\w+)", " ".join(harmful.what_to_try)))
    assert "sft_weight" in keys and keys <= set(TrainConfig.model_fields)
    # Chosen falling faster than rejected is harmful without any evaluation.
    worse = doctor.chosen_logps_falling(artifacts(rows(chosen=lambda s: -0.2 * s, rejected=lambda s: -0.05 * s)))
    assert worse.severity == "warning"
    assert doctor.chosen_logps_falling(artifacts(rows(**HEALTHY))) is None
    # Reference-free losses log beta * mean log-prob, not a log-ratio to a reference: not judged.
    assert doctor.chosen_logps_falling(artifacts(rows(**falling), reference="none")) is None


def test_nonfinite():
    bad = rows(**HEALTHY)
    bad[4] = MetricsRow.model_validate({**bad[4].model_dump(), "rewards/margins": float("nan")})
    found = doctor.nonfinite(artifacts(bad))
    assert found.numbers["first"] == {"step": 5, "key": "rewards/margins", "value": "nan"}
    assert doctor.nonfinite(artifacts(rows(**HEALTHY), evaluation())) is None
    # --json stays valid JSON (no bare NaN).
    json.loads(json.dumps(found.model_dump(mode="json"), allow_nan=False))


def test_kl_large():
    far = doctor.kl_large(artifacts(rows(**HEALTHY), evaluation(kl_per_answer=30.0, tokens=20)))
    assert far.numbers["kl_per_token"] == pytest.approx((30.0 * 12 + 0.1 * 12) / (20 * 12), abs=1e-3)
    assert doctor.kl_large(artifacts(rows(**HEALTHY), evaluation(kl_per_answer=4.0, tokens=20))) is None


def test_length_exploitation():
    # Tuned wins all 6 pairs where it is longer and none of the 6 length-matched ones.
    outcomes = [1] * 6 + [-1, 0, -1, 0, -1, -1]
    len_base = [20] * 12
    len_tuned = [40] * 6 + [20] * 6
    found = doctor.length_exploitation(artifacts(rows(**HEALTHY), evaluation(outcomes=outcomes, len_base=len_base,
                                                                             len_tuned=len_tuned)))
    assert found.numbers["buckets"]["tuned_longer"] == {"n": 6, "win_rate": 1.0}
    assert found.numbers["buckets"]["length_matched"]["win_rate"] == pytest.approx(2 / 12)
    assert "Park et al. 2024" in found.source
    # The same wins among length-matched pairs are real.
    real = evaluation(outcomes=[1] * 6 + [1, 1, 0, 1, 1, 1], len_base=len_base, len_tuned=len_tuned)
    assert doctor.length_exploitation(artifacts(rows(**HEALTHY), real)) is None


def _samples(base, tuned):
    return [EvalSample(prompt="p", sample=i, base=b, tuned=t, base_tokens=9, tuned_tokens=9, outcome=0,
                       kl_sequence=0.0) for i, (b, t) in enumerate(zip(base, tuned, strict=True))]


def test_distinct_n_and_repetition():
    assert doctor.distinct_n("a b a b a".split()) == pytest.approx(2 / 4)  # ab ba ab ba
    assert doctor.distinct_n("a b".split()) is None
    base = [f"the sea was calm and bright on day {i}" for i in range(6)]
    loops = [f"so good so good so good so good {i}" for i in range(6)]
    found = doctor.repetition(artifacts(rows(**HEALTHY), evaluation(), _samples(base, loops)))
    # 9 words, 8 bigrams, 3 distinct: (so, good), (good, so), (good, i)
    assert found.numbers["base"] == 1.0 and found.numbers["tuned"] == pytest.approx(3 / 8)
    assert "#7734" in found.source
    assert doctor.repetition(artifacts(rows(**HEALTHY), evaluation(), _samples(base, base))) is None
    # Text without spaces (Chinese) is measured in characters.
    zh_loop = ["好的好的好的好的好的"] * 6
    zh = ["今天的大海很平静也很明亮"] * 6
    assert doctor.repetition(artifacts(rows(**HEALTHY), evaluation(), _samples(zh, zh_loop))) is not None


def test_eval_train_gap():
    train = rows(acc=lambda s: 1.0, margin=lambda s: 0.5)
    gap = doctor.eval_train_gap(artifacts(train, evaluation(accuracy=(30, 48))))
    assert gap.numbers["tail_train_accuracy"] == 1.0 and gap.numbers["heldout_accuracy"] == pytest.approx(30 / 48)
    assert doctor.eval_train_gap(artifacts(train, evaluation(accuracy=(46, 48)))) is None
    # A held-out loss far above the training loss, from train.eval_steps rows.
    with_eval_loss = train + [MetricsRow.model_validate({"step": 12, "eval_loss": 0.9})]
    assert "held-out loss 0.900" in doctor.eval_train_gap(artifacts(with_eval_loss)).evidence


def test_without_eval_only_curve_rules_run_and_say_so():
    findings = run_rules(artifacts(rows(**HEALTHY)))
    assert [f.id for f in findings] == ["rules_skipped"] and findings[0].severity == "info"
    assert set(findings[0].numbers["skipped"]) == {"lost_to_base", "no_measurable_gain", "length_collapse",
                                                   "kl_large", "length_exploitation", "repetition"}
    assert "no eval.json" in findings[0].evidence
    assert verdict(findings, None).startswith("Not measured: no eval.json")


def test_verdict_does_not_claim_success_at_chance():
    said = verdict([], evaluation(accuracy=(25, 48)))  # win rate 0.62 [0.35, 0.84] of 12 answers
    assert said.startswith("No measurable change: ")


def test_every_rule_is_documented_with_its_threshold_and_source():
    from conftest import ROOT

    text = (ROOT / "docs" / "doctor.md").read_text()
    for rule, _ in doctor.RULES:
        assert f"`{rule.__name__}`" in text, rule.__name__
    for name in ("STUCK_LOSS_TOLERANCE", "SATURATED_MARGIN", "CHOSEN_FALL_NATS", "KL_PER_TOKEN_LARGE",
                 "REPETITION_DROP", "GAP_ACCURACY", "LONGER_WIN_RATE", "LENGTH_COLLAPSE_RATIO", "MIN_COLLAPSE_BASE_TOKENS"):
        assert f"`{name}` = {getattr(doctor, name)}" in text, name
    for source in ("#1311", "#1627", "#800", "#7643", "#7734", "Park et al. 2024", "Azar et al. 2023",
                   "Rafailov et al. 2023"):
        assert source in text, source


# --- real tiny runs, broken on purpose ---------------------------------------------------------------------------

def _train(tmp_path_factory, name, train, data=None):
    from dpokit.eval import evaluate_run
    from dpokit.train.trainer import run_training

    tmp = tmp_path_factory.mktemp(name)
    cfg = tiny_config(tmp, train=train, data=data or {},
                      eval={"num_prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 8})
    result = run_training(config_from_dict(cfg))
    evaluate_run(result.run_dir)
    return tmp / "run"


@pytest.fixture(scope="module")
def lr_too_low(tmp_path_factory):
    return _train(tmp_path_factory, "lr-low", {"learning_rate": 1e-7, "max_steps": 12})


@pytest.fixture(scope="module")
def lr_too_high(tmp_path_factory):
    return _train(tmp_path_factory, "lr-high", {"learning_rate": 3e-2, "max_steps": 12})


@pytest.fixture(scope="module")
def too_many_epochs(tmp_path_factory):
    # 24 pairs, 3 steps an epoch, 15 epochs at a normal learning rate: memorised.
    return _train(tmp_path_factory, "epochs", {"learning_rate": 1e-3, "epochs": 15}, data={"max_rows": 24})


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    return _train(tmp_path_factory, "healthy", {"learning_rate": 1e-3, "max_steps": 12})


BROKEN = {"loss_stuck_at_ln2", "reward_accuracy_saturated"}


def test_learning_rate_far_too_low_is_loss_stuck_at_ln2(lr_too_low):
    findings = diagnose(lr_too_low)
    assert "loss_stuck_at_ln2" in ids(findings)
    assert "reward_accuracy_saturated" not in ids(findings)
    stuck = next(f for f in findings if f.id == "loss_stuck_at_ln2")
    assert stuck.numbers["peak_learning_rate"] == pytest.approx(1e-7)


def test_learning_rate_far_too_high_is_reward_accuracy_saturated(lr_too_high):
    findings = diagnose(lr_too_high)
    assert "reward_accuracy_saturated" in ids(findings) and "loss_stuck_at_ln2" not in ids(findings)
    assert "kl_large" in ids(findings)  # 3e-2 also drags the model far from the base


def test_too_many_epochs_is_reward_accuracy_saturated(too_many_epochs):
    findings = diagnose(too_many_epochs)
    assert "reward_accuracy_saturated" in ids(findings) and "loss_stuck_at_ln2" not in ids(findings)


def test_healthy_run_flags_none(healthy):
    findings = diagnose(healthy)
    # No curve or drift rule fires. The tiny model's answers all score 0 by the sentiment judge (8 ties), so the
    # outcome is honestly "no measurable change", not a gain.
    assert ids(findings) == {"no_measurable_gain"}, [f.evidence for f in findings]
    assert verdict(findings, RunDir(healthy).read_eval()).startswith("No measurable change: ")


# --- the CLI -----------------------------------------------------------------------------------------------------

def doctor_cli(capsys, monkeypatch, *args):
    """`dpokit doctor ARGS` through the CLI's own `main` (its error handling included), in this process: a fresh
    interpreter spends 10-20 s importing torch on the 2-core test machine. Returns (exit code, stdout, stderr)."""
    from dpokit.cli import main

    monkeypatch.setattr(sys, "argv", ["dpokit", "doctor", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json(lr_too_low, capsys, monkeypatch):
    code, stdout, stderr = doctor_cli(capsys, monkeypatch, lr_too_low, "--json")
    assert code == 0, stderr
    out = json.loads(stdout)
    stuck = next(f for f in out["findings"] if f["id"] == "loss_stuck_at_ln2")
    assert {"evidence", "numbers", "meaning", "what_to_try", "source", "severity"} <= set(stuck)
    assert out["verdict"].startswith(("No measurable change:", "Worse:", "Better:"))
    assert "loss_stuck_at_ln2" in out["verdict"].split("Causes: ")[-1]


def test_cli_text(lr_too_high, capsys, monkeypatch):
    code, stdout, _ = doctor_cli(capsys, monkeypatch, lr_too_high)
    first = stdout.splitlines()[0]
    assert code == 0 and first.startswith(("No measurable change:", "Worse:", "Better:"))
    assert "reward_accuracy_saturated" in first
    assert "train.learning_rate" in stdout and "docs/doctor.md" in stdout


def test_cli_bad_input_is_one_line_exit_2(tmp_path, lr_too_low, capsys, monkeypatch):
    code, _, err = doctor_cli(capsys, monkeypatch, tmp_path / "nowhere")
    assert code == 2 and "not a dpokit run folder" in err and "nowhere" in err
    assert len(err.strip().splitlines()) == 1
    run = tmp_path / "no-metrics"
    run.mkdir()
    shutil.copy(lr_too_low / "config.yaml", run / "config.yaml")
    code, _, err = doctor_cli(capsys, monkeypatch, run)
    assert code == 2 and "metrics.jsonl" in err and "dpokit train" in err and len(err.strip().splitlines()) == 1


# --- the report --------------------------------------------------------------------------------------------------

def test_report_escapes_model_text(lr_too_high, tmp_path):
    from dpokit.report import write_report

    run = tmp_path / "run"
    shutil.copytree(lr_too_high, run)
    rows_ = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
    for row in rows_:  # a tuned model that loops on markup: repetition, and the text must stay text
        row["base"], row["tuned"] = "the sea was calm and bright today", "<script>alert(1)</script> " * 6
    (run / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    text = write_report(run).read_text()
    assert "<script" not in text and "&lt;script&gt;alert(1)" in text
    assert "repetition" in text.split('id="verdict"')[1].split("</p>")[0]
    section = text.split('id="curves-meaning"')[1]
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &lt;script&gt;" in section  # the finding quotes the answer


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_verdict_renders_in_chromium(lr_too_high, tmp_path):
    """The verdict is the first thing on the page: laid out, visible, with the findings' ids. Measured by a probe
    script in a copy of the report (the report itself has no scripts), and seen in a screenshot (saved)."""
    from PIL import Image

    from dpokit.report import write_report

    page = write_report(lr_too_high, out=tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", """<script>
const el = document.getElementById('verdict'), r = el.getBoundingClientRect(), cs = getComputedStyle(el);
const out = document.createElement('pre'); out.id = 'probe';
out.textContent = JSON.stringify({y: r.y, width: r.width, height: r.height, display: cs.display,
                                  visibility: cs.visibility, background: cs.backgroundColor, text: el.innerText});
document.body.appendChild(out);
</script></body>"""))
    res = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert res.returncode == 0 and found, res.stderr[-2000:]
    box = json.loads(html.unescape(found.group(1)))
    assert box["display"] != "none" and box["visibility"] == "visible"
    assert box["width"] > 500 and box["height"] > 20 and box["y"] < 200, box  # the page's first line
    assert "reward_accuracy_saturated" in box["text"] and "kl_large" in box["text"]
    assert box["background"] in ("rgb(255, 244, 224)", "rgb(253, 232, 232)")  # .verdict.warn or .verdict.bad

    shot = tmp_path / "verdict.png"
    res = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    colour = tuple(int(c) for c in re.findall(r"\d+", box["background"]))
    # The verdict box's background, found in the screenshot: a wide band near the top.
    width, height = image.size
    top = image.crop((0, 0, width, 300))
    xs, ys = [], []
    for i, pixel in enumerate(top.getdata()):
        if pixel == colour:
            xs.append(i % width)
            ys.append(i // width)
    assert xs, "no verdict box in the screenshot"
    assert max(xs) - min(xs) > 500 and max(ys) - min(ys) > 20, (min(xs), max(xs), min(ys), max(ys))
