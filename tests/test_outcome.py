"""The outcome verdict (dpokit.eval.outcome) and its doctor rules (`lost_to_base`, `no_measurable_gain`,
`length_collapse`), on run folders whose eval.json, eval_samples.jsonl and metrics.jsonl are written by the same
functions and writers `dpokit eval` uses (no trained model: the folders are built from judged answers); the
length-controlled win rate against a closed-form value and an independent scipy fit; the first line of the doctor,
the report (HTML and Markdown), and the quickstart and iterate summaries."""

import io
import json
import math
import random

import numpy as np
import pytest
from rich.console import Console
from scipy.optimize import minimize

from conftest import tiny_config
from dpokit.core.config import config_from_dict
from dpokit.core.io import write_jsonl
from dpokit.core.run import EvalResult, EvalSample, LengthControlledWinRate, RunDir
from dpokit.eval import doctor, generation_summary
from dpokit.eval.doctor import diagnose, run_verdict, verdict
from dpokit.eval.likelihood import preference_metrics
from dpokit.eval.metrics import kl_summary, length_controlled_win_rate, outcome_summary
from dpokit.eval.outcome import judge_outcome

LN2 = math.log(2)


# --- run folders from judged answers -----------------------------------------------------------------------------

def answers(n_win, n_tie, n_loss, base_len, tuned_len, base_score=2.6, win_by=0.6, lose_by=0.9, seed=0):
    """Judged answer pairs: (outcome, base tokens, tuned tokens, base score, tuned score) with the outcome the sign
    of the score difference (a pointwise judge), lengths drawn around the given means."""
    rng = random.Random(seed)
    rows = []
    for outcome, count, delta in ((1, n_win, win_by), (0, n_tie, 0.0), (-1, n_loss, -lose_by)):
        for _ in range(count):
            b = base_score + rng.uniform(-0.5, 0.5)
            t = b + delta * rng.uniform(0.5, 1.5) if outcome else b
            rows.append((outcome, max(1, round(base_len * rng.uniform(0.7, 1.3))),
                         max(1, round(tuned_len * rng.uniform(0.7, 1.3))), b, t))
    rng.shuffle(rows)
    return rows


def make_run(tmp_path, name, rows, kl_per_answer=2.0):
    """A run folder with healthy training curves and an evaluation of `rows` (see `answers`), written through
    RunDir like `dpokit train` and `dpokit eval` write them."""
    cfg = config_from_dict(tiny_config(tmp_path / name))
    run = RunDir(cfg.output.dir)
    run.create(cfg, replace=True)
    write_jsonl(run.metrics, [{"step": s, "loss": LN2 - 0.02 * s, "learning_rate": 1e-3,
                               "rewards/accuracies": min(0.5 + 0.03 * s, 0.8), "rewards/margins": 0.05 * s,
                               "rewards/chosen": -0.005 * s, "rewards/rejected": -0.06 * s} for s in range(1, 13)])
    outcomes = [r[0] for r in rows]
    len_b, len_t = [r[1] for r in rows], [r[2] for r in rows]
    scores_b, scores_t = [r[3] for r in rows], [r[4] for r in rows]
    gen = generation_summary(cfg.eval, {"name": "python", "kind": "pointwise", "details": {}}, len(rows), outcomes,
                             len_t, len_b, scores_t, scores_b)
    kl = kl_summary([kl_per_answer + 0.1 * (i % 3) for i in range(len(rows))], [0.0] * len(rows), len_t,
                    exact_sampling=True)
    # 48 held-out pairs, the tuned model ranks 40 right (implicit-reward accuracy 0.83).
    base_lp = {"chosen": [-20.0] * 48, "rejected": [-20.0] * 48, "chosen_tokens": [10] * 48,
               "rejected_tokens": [10] * 48}
    tuned_lp = {**base_lp, "chosen": [-18.0] * 40 + [-22.0] * 8}
    result = EvalResult.model_validate({
        "run_dir": str(run.path), "model": cfg.model.name_or_path, "beta": cfg.train.beta,
        "settings": cfg.eval.model_dump(mode="json"),
        "preference": preference_metrics(tuned_lp, base_lp, cfg.train.beta), "generation": gen, "kl": kl})
    samples = [EvalSample(prompt=f"explain thing {i}", sample=0, base="a fair, finished answer " * (r[1] // 4 + 1),
                          tuned=("No idea, mum. " if r[2] < 12 else "a clear and finished answer ") * (r[2] // 4 + 1),
                          base_tokens=r[1], tuned_tokens=r[2], outcome=r[0], base_score=r[3], tuned_score=r[4],
                          kl_sequence=kl_per_answer) for i, r in enumerate(rows)]
    run.write_eval(result, samples)
    return run.path


# The run: 4 won, 2 tied, 23 lost; answers 41 -> 8 tokens; the judge's mean score fell.
LOST = dict(n_win=4, n_tie=2, n_loss=23, base_len=41, tuned_len=8)
IMPROVED = dict(n_win=34, n_tie=2, n_loss=4, base_len=20, tuned_len=21)
UNCHANGED = dict(n_win=14, n_tie=3, n_loss=13, base_len=20, tuned_len=20, win_by=0.3, lose_by=0.3)


@pytest.fixture
def lost(tmp_path):
    return make_run(tmp_path, "lost", answers(**LOST))


@pytest.fixture
def improved(tmp_path):
    return make_run(tmp_path, "improved", answers(**IMPROVED))


def ids(findings):
    return [f.id for f in findings if f.severity == "warning"]


# --- the rules ---------------------------------------------------------------------------------------------------

def test_lost_run_is_worse_lost_to_base_and_length_collapse_first(lost):
    findings = diagnose(lost)
    found = ids(findings)
    assert found[:2] == ["lost_to_base", "length_collapse"], found  # the outcome rules come before the others
    said = verdict(findings, RunDir(lost).read_eval())
    assert said.startswith("Worse: the tuned model lost to the base by the judge python on 29 answers: win rate 0.17")
    assert "(4 won, 2 tied, 23 lost)" in said and "Causes: length_collapse" in said
    assert "lost_to_base" not in said  # the decision itself is not its own cause
    lost_f = next(f for f in findings if f.id == "lost_to_base")
    assert lost_f.numbers["win_rate_ci"][1] < 0.5 and lost_f.numbers["score_change_ci"][1] < 0
    assert "win rate's interval is entirely below 0.5" in lost_f.evidence
    collapse = next(f for f in findings if f.id == "length_collapse")
    assert collapse.numbers["ratio"] < doctor.LENGTH_COLLAPSE_RATIO and "No idea" in collapse.evidence


def test_improved_run_is_better_and_no_outcome_rule_fires(improved):
    findings = diagnose(improved)
    assert not {"lost_to_base", "no_measurable_gain", "length_collapse"} & set(ids(findings))
    said, direction = run_verdict(improved)
    assert direction == "better" and said.startswith("Better: the tuned model beat the base by the judge python")
    assert "length-controlled win rate" in said


def test_unchanged_run_is_no_measurable_gain(tmp_path):
    run = make_run(tmp_path, "same", answers(**UNCHANGED))
    findings = diagnose(run)
    assert ids(findings)[0] == "no_measurable_gain" and "lost_to_base" not in ids(findings)
    gain = findings[0]
    assert gain.numbers["win_rate_ci"][0] < 0.5 < gain.numbers["win_rate_ci"][1]
    assert verdict(findings, RunDir(run).read_eval()).startswith("No measurable change: ")


def test_score_fell_while_the_win_rate_straddles_is_lost_to_base(tmp_path):
    # 15 small wins, 15 large losses: win rate 0.5 [0.33, 0.67], but the mean judge score fell.
    run = make_run(tmp_path, "score", answers(15, 0, 15, 20, 20, win_by=0.1, lose_by=1.5))
    result = RunDir(run).read_eval()
    wr = result.generation.outcomes.win_rate
    assert wr.ci[0] < 0.5 < wr.ci[1]
    out = judge_outcome(result)
    assert out.direction == "worse" and out.score_change.ci[1] < 0
    assert out.reasons == ["the judge score change's interval is entirely below 0"]
    assert "lost_to_base" in ids(diagnose(run))


def test_length_collapse_needs_half_the_length_and_intervals_apart(tmp_path):
    # 0.6x the base's length: shorter, not collapsed.
    shorter = make_run(tmp_path, "shorter", answers(20, 0, 10, 40, 24))
    assert doctor.length_collapse(doctor.read_artifacts(shorter)) is None
    # 0.45x on average, but 4 answers of widely varying length: the intervals overlap, not evidence.
    rows = [(1, 10, 2, 2.0, 3.0), (1, 60, 40, 2.0, 3.0), (-1, 5, 1, 2.0, 1.0), (1, 45, 10, 2.0, 3.0)]
    noisy = make_run(tmp_path, "noisy", rows)
    lengths = RunDir(noisy).read_eval().generation.lengths
    assert lengths.tuned.mean.value < 0.5 * lengths.base.mean.value
    assert doctor.length_collapse(doctor.read_artifacts(noisy)) is None
    collapsed = make_run(tmp_path, "collapsed", answers(20, 0, 10, 40, 15))
    assert doctor.length_collapse(doctor.read_artifacts(collapsed)).id == "length_collapse"


def test_without_judged_answers_the_outcome_is_not_measured(lost):
    result = RunDir(lost).read_eval().model_copy(update={"generation": None})
    said = verdict([], result)
    assert said.startswith("Not measured: no judged answers (eval.generate: false)")
    assert "implicit-reward accuracy 0.83" in said
    assert judge_outcome(None).direction == "not_measured"


# --- the first line everywhere -----------------------------------------------------------------------------------

def test_doctor_cli_first_line(lost, improved, capsys, monkeypatch):
    from test_doctor import doctor_cli

    code, stdout, _ = doctor_cli(capsys, monkeypatch, lost)
    assert code == 0 and stdout.splitlines()[0].startswith("Worse: the tuned model lost to the base")
    code, stdout, _ = doctor_cli(capsys, monkeypatch, improved, "--json")
    out = json.loads(stdout)
    assert out["outcome"] == "better" and out["verdict"].startswith("Better:")


def test_report_first_line_html_and_markdown(lost, improved):
    from dpokit.report import write_report

    for run, word, cls in ((lost, "Worse:", "bad"), (improved, "Better:", "ok")):
        page = write_report(run).read_text()
        body = page.split("<body>", 1)[1]
        assert body.startswith(f'<p id="verdict" class="verdict {cls}">{word}'), body[:200]
        md = (run / "report.md").read_text()
        assert md.splitlines()[0].startswith(f"**{word}")
        assert "length-controlled win rate" in page and "length-controlled win rate" in md


def test_quickstart_summary_first_line(lost):
    from dpokit.quickstart import print_summary

    said, direction = run_verdict(lost)
    summary = {"verdict": said, "outcome": direction, "model": "m", "win_rate": 0.17, "win_rate_ci": [0.08, 0.35],
               "wins": 4, "ties": 2, "losses": 23, "lc_win_rate": 0.2, "lc_win_rate_ci": [0.1, 0.4],
               "mean_score_base": 2.6, "mean_score_tuned": 1.86, "implicit_reward_accuracy": 0.9, "kl": 11.9,
               "mean_length_base": 41.0, "mean_length_tuned": 8.0, "train_pairs": 80, "eval_pairs": 20,
               "wall_seconds": 10.0, "stage_seconds": {"train": 5.0}, "report": None}
    buf = io.StringIO()
    print_summary(summary, Console(file=buf, width=100))
    assert buf.getvalue().splitlines()[0].startswith("Worse: the tuned model lost to the base")


def test_iterate_summary_first_line(lost):
    from dpokit.iterate import format_table

    said, direction = run_verdict(lost)
    summary = {"verdict": f"Last round vs pi0: {said}", "outcome": direction, "rounds": [], "initial": None}
    assert format_table(summary).splitlines()[0].startswith("Last round vs pi0: Worse:")


# --- the length-controlled win rate ------------------------------------------------------------------------------

def test_lc_win_rate_equals_the_closed_form_of_a_saturated_fit():
    """Two length groups, z = +c (6 pairs: 5 wins, 1 loss) and z = -c (2 pairs: 1 win, 1 loss). With ridge 0 the
    two-parameter logistic model is saturated: sigmoid(a + b c) = 5/6 and sigmoid(a - b c) = 1/2, so
    a = (logit 5/6 + logit 1/2) / 2 = ln(5) / 2 whatever c is, and the LC win rate sigmoid(a) = sqrt 5 / (1 + sqrt 5)
    = 0.69098 (the raw win rate is 6/8 = 0.75: the wins come with longer answers). The MLE of a saturated logit is
    the group logits, each with variance 1 / (n_g p_g (1 - p_g)): Var(a) = (1/4) (1 / (6 * 5/6 * 1/6) +
    1 / (2 * 1/2 * 1/2)) = (1/4) (6/5 + 2) = 0.8, so the interval is sigmoid(ln(5)/2 -+ 1.959964 sqrt(0.8))."""
    outcomes = [1, 1, 1, 1, 1, -1, 1, -1]
    len_t, len_b = [20] * 6 + [10] * 2, [10] * 6 + [20] * 2
    fit = length_controlled_win_rate(outcomes, len_t, len_b, ridge=0.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    a, se = math.log(5) / 2, math.sqrt(0.8)
    assert fit.value == pytest.approx(math.sqrt(5) / (1 + math.sqrt(5)), abs=1e-9)
    assert fit.intercept == pytest.approx(a, abs=1e-9)
    assert fit.ci == pytest.approx([sig(a - 1.959964 * se), sig(a + 1.959964 * se)], abs=1e-6)
    assert outcome_summary(outcomes).win_rate.value == 0.75


def test_lc_win_rate_matches_an_independent_scipy_fit_with_the_default_ridge():
    rng = np.random.default_rng(3)
    n = 60
    len_b = rng.integers(10, 40, n)
    len_t = len_b + rng.integers(-15, 25, n)
    d = (len_t - len_b).astype(float)
    z = d / d.std()
    p_true = 1 / (1 + np.exp(-(0.3 + 1.2 * z)))
    outcomes = [1 if u < p else -1 for u, p in zip(rng.random(n), p_true, strict=True)]
    outcomes[:5] = [0] * 5
    fit = length_controlled_win_rate(outcomes, len_t.tolist(), len_b.tolist())
    y = (np.array(outcomes) + 1) / 2

    def neg_loglik(theta):
        eta = theta[0] + theta[1] * z
        return -(y * eta - np.logaddexp(0, eta)).sum() + 0.5 * 1.0 * theta[1] ** 2

    res = minimize(neg_loglik, np.zeros(2), method="BFGS", options={"gtol": 1e-10})
    a, b = res.x
    p = 1 / (1 + np.exp(-(a + b * z)))
    w = p * (1 - p)
    info = np.array([[w.sum(), (w * z).sum()], [(w * z).sum(), (w * z * z).sum() + 1.0]])
    se = math.sqrt(np.linalg.inv(info)[0, 0])
    assert fit.intercept == pytest.approx(a, abs=1e-5) and fit.slope == pytest.approx(b, abs=1e-5)
    assert fit.value == pytest.approx(1 / (1 + math.exp(-a)), abs=1e-6)
    assert fit.ci[0] == pytest.approx(1 / (1 + math.exp(-(a - 1.959964 * se))), abs=1e-5)
    assert fit.length_diff_sd == pytest.approx(d.std())


def test_lc_win_rate_edge_cases():
    every_win = length_controlled_win_rate([1] * 10, [5] * 10, [3] * 10)
    assert every_win.value == 1.0 and every_win.method.startswith("every outcome equal")
    # Separation (the one loss is the shortest tuned answer): the ridge keeps the fit finite.
    separated = length_controlled_win_rate([-1] + [1] * 9, [1] + [10 + i for i in range(9)], [10] * 10)
    assert separated is not None and 0.5 < separated.value < 1.0
    assert length_controlled_win_rate([1, -1], [4, 4], [3, 3]) is None  # every answer 1 token longer: confounded
    assert length_controlled_win_rate([None, None], [4, 5], [3, 3]) is None


def test_lc_win_rate_is_in_eval_json_and_flags_a_length_only_gain(tmp_path):
    # Wins come with longer answers: 22 of 24 longer tuned answers win, 1 of 6 shorter ones. Raw 0.77, above 0.5;
    # at equal length the interval reaches 0.5.
    rows = [(1, 10, 20, 2.0, 2.5)] * 22 + [(-1, 10, 20, 2.0, 1.5)] * 2 + [(1, 20, 10, 2.0, 2.5)] + \
           [(-1, 20, 10, 2.0, 1.5)] * 5
    run = make_run(tmp_path, "longer", rows)
    lc = RunDir(run).read_eval().generation.length_controlled.win_rate
    assert isinstance(lc, LengthControlledWinRate) and lc.n == 30
    raw = RunDir(run).read_eval().generation.outcomes.win_rate
    assert raw.ci[0] > 0.5 and lc.value < raw.value and lc.ci[0] < 0.5
    said = verdict(diagnose(run), RunDir(run).read_eval())
    assert said.startswith("Better:") and "the gain may be length, not quality" in said


# --- in a real browser -------------------------------------------------------------------------------------------

def test_report_first_visible_line_in_chromium(lost, improved, browser):
    """Headless Chromium renders each report; the first line of visible text on the page is the verdict, above the
    title and inside the first screen: "Worse: ..." (red) for the run that lost, "Better: ..." (green) for the one
    that improved."""
    from selenium.webdriver.common.by import By

    from dpokit.report import write_report

    for run, word, colour in ((lost, "Worse:", "rgba(253, 232, 232, 1)"), (improved, "Better:", "rgba(230, 244, 234, 1)")):
        browser.get(write_report(run).as_uri())
        first = browser.find_element(By.TAG_NAME, "body").text.splitlines()[0]  # visible text only
        assert first.startswith(word), first
        box = browser.find_element(By.ID, "verdict")
        assert box.is_displayed() and box.text.splitlines()[0] == first
        title = browser.find_element(By.TAG_NAME, "h1")
        assert box.location["y"] < title.location["y"] and box.location["y"] + box.size["height"] < 800
        assert box.value_of_css_property("background-color") == colour
