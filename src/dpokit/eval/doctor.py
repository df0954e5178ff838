"""`dpokit doctor`: rules that read a finished run's curves and evaluation and say what they mean.

Entry point: `diagnose(run_dir) -> list[Finding]`. Each rule is a pure function of `RunArtifacts` (the typed
metrics rows, eval.json and eval samples, read through `RunDir`) that returns a `Finding` or None; thresholds are
the named constants below. docs/doctor.md documents every rule with its source (a paper or a tracker issue).

The training-curve rules read `metrics.jsonl` only; the others need eval.json (and its samples). Without eval.json
only the curve rules run, and an info finding `rules_skipped` says which rules did not and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from dpokit.core.errors import UserError
from dpokit.core.run import EvalResult, EvalSample, MetricsRow, RunDir
from dpokit.eval.outcome import judge_outcome

LN2 = math.log(2)

# length_collapse: the tuned answers are much shorter than the base's.
LENGTH_COLLAPSE_RATIO = 0.5   # mean tuned length / mean base length below this, with the two intervals apart
MIN_COLLAPSE_BASE_TOKENS = 4  # base answers shorter than this have no room to collapse

# Curve rules judge the end of training: the last TAIL_FRACTION of the logged training rows, at least MIN_TAIL_ROWS.
TAIL_FRACTION = 0.25
MIN_TAIL_ROWS = 3
# Fewer logged training rows than this and no curve rule judges the run (a 2-step run sits at ln 2 by design).
MIN_ROWS = 5

# loss_stuck_at_ln2: the sigmoid DPO loss is ln 2 when the policy equals the reference (margin 0).
STUCK_LOSS_TOLERANCE = 0.01   # |mean tail loss - ln 2|
STUCK_MARGIN = 0.02           # mean tail |rewards/margins|

# chosen_logps_falling: chosen log-prob relative to the reference, in nats per answer (rewards/chosen / beta).
CHOSEN_FALL_NATS = 1.0

# reward_accuracy_saturated: every training pair ranked right, by a margin the sigmoid loss no longer needs.
SATURATED_ACCURACY = 0.95
SATURATED_MARGIN = 2.0        # loss -log(sigmoid(2)) = 0.127 per pair; the margin keeps growing from here

# kl_large: KL(tuned || base) on the tuned model's samples, nats per token.
KL_PER_TOKEN_LARGE = 0.5

# length_exploitation: wins only among longer answers.
MIN_BUCKET_PAIRS = 5          # judged pairs a length bucket needs before its win rate counts
LONGER_WIN_RATE = 0.6         # win rate among tuned-longer pairs that counts as winning there
MATCHED_WIN_RATE_MAX = 0.5    # ... while not winning among length-matched pairs
LENGTH_GROWTH = 1.2           # mean tuned length / mean base length (the regression form)

# repetition: distinct-n (unique n-grams / all n-grams of an answer's words, or characters, averaged over answers).
DISTINCT_N = 2
REPETITION_DROP = 0.15        # absolute drop of mean distinct-2, base -> tuned
MIN_REPETITION_ANSWERS = 5    # answers of at least DISTINCT_N + 1 words, per model

# eval_train_gap: the end of training vs held-out.
GAP_ACCURACY = 0.15           # tail train reward accuracy - held-out implicit-reward accuracy
GAP_LOSS = 0.2                # last logged eval_loss - mean tail train loss


class Finding(BaseModel):
    """One thing the doctor noticed: what it saw (numbers and steps), what that means, what to try."""

    id: str = Field(description="the rule's name, e.g. loss_stuck_at_ln2")
    severity: Literal["warning", "info"] = Field(description="warning: likely a problem; info: explained, "
                                                 "normal, or a note on what was not checked")
    title: str = Field(description="one line")
    evidence: str = Field(description="what was seen: numbers and steps")
    numbers: dict[str, Any] = Field(default_factory=dict, description="the evidence's numbers, by name")
    meaning: str = Field(description="what it usually means")
    what_to_try: list[str] = Field(default_factory=list, description="config changes or checks, most likely first")
    source: str = Field("", description="where the rule comes from: a paper or a tracker issue")

    @field_validator("numbers")
    @classmethod
    def _json_safe(cls, numbers: dict) -> dict:
        # --json must stay valid JSON: NaN or inf (an interval of one value, an empty bucket) becomes null.
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean(numbers)


@dataclass
class RunArtifacts:
    """What the rules read: one run folder's artifacts, typed."""

    metrics: list[MetricsRow]
    beta: float
    reference: str = "model"          # the reference actually used; "none" for reference-free losses
    eval: EvalResult | None = None
    samples: list[EvalSample] = field(default_factory=list)


# --- reading the curves ------------------------------------------------------------------------------------------

def series(rows: list[MetricsRow], key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric over the training rows: rows that log `loss` (eval_* rows and the final summary
    row, which logs `train_loss`, are left out). Non-numeric values are skipped; NaN and inf are kept."""
    points = []
    for row in rows:
        values = row.model_dump()
        if values.get("loss") is None:
            continue
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            points.append((row.step, float(value)))
    return points


def tail(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The end of training: the last TAIL_FRACTION of the points, at least MIN_TAIL_ROWS."""
    return points[-max(MIN_TAIL_ROWS, math.ceil(len(points) * TAIL_FRACTION)):]


def mean(points: list[tuple[int, float]]) -> float:
    return sum(v for _, v in points) / len(points) if points else float("nan")


def _steps(points: list[tuple[int, float]]) -> str:
    return f"steps {points[0][0]}-{points[-1][0]}" if points else "no steps"


def _r(x: float, digits: int = 3) -> float:
    return round(x, digits) if math.isfinite(x) else x


def _f(x: float | None) -> str:
    """Two decimals; "n/a" for a missing value (an evaluation of zero pairs)."""
    return "n/a" if x is None else f"{x:.2f}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --- rules: training curves --------------------------------------------------------------------------------------

def nonfinite(a: RunArtifacts) -> Finding | None:
    """Any NaN or inf in a logged metric, or in eval.json's headline numbers."""
    bad = []
    for row in a.metrics:
        for key, value in row.model_dump().items():
            if isinstance(value, float) and not math.isfinite(value):
                bad.append((row.step, key, repr(value)))
    if a.eval is not None:
        pref = a.eval.preference
        checks = {"eval.json preference.implicit_reward_accuracy": pref.implicit_reward_accuracy.value,
                  "eval.json preference.reward_margin": pref.reward_margin.value}
        if a.eval.kl is not None:
            checks["eval.json kl.sequence"] = a.eval.kl.sequence.value
        bad += [(None, key, repr(v)) for key, v in checks.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return None
    step, key, value = bad[0]
    where = f"at step {step}" if step is not None else "in the evaluation"
    return Finding(
        id="nonfinite", severity="warning", title="non-finite numbers in the run",
        evidence=f"{len(bad)} non-finite value(s); the first is {key} = {value} {where}.",
        numbers={"count": len(bad), "first": {"step": step, "key": key, "value": value}},
        meaning="The numbers overflowed: a learning rate too high, fp16 overflow, or an empty response after "
                "truncation (a log-prob of nothing). With fp16 a few inf grad norms early on are the loss scaler "
                "skipping steps; anything in the loss or rewards is not.",
        what_to_try=["lower train.learning_rate (e.g. 10x)", "train.precision: bf16 (or fp32) instead of fp16",
                     "keep train.max_grad_norm > 0 (1.0)",
                     "check data.max_length against the data report's truncation counts (dpokit data inspect)"],
        source="Micikevicius et al. 2018, Mixed Precision Training (fp16 overflow and loss scaling)")


def loss_stuck_at_ln2(a: RunArtifacts) -> Finding | None:
    """The loss never leaves ln 2 and the reward margin stays ~0: the policy did not move from the reference."""
    loss = series(a.metrics, "loss")
    if len(loss) < MIN_ROWS:
        return None
    end = tail(loss)
    margins = tail(series(a.metrics, "rewards/margins"))
    mean_margin = mean([(s, abs(v)) for s, v in margins]) if margins else 0.0
    if abs(mean(end) - LN2) > STUCK_LOSS_TOLERANCE or mean_margin > STUCK_MARGIN:
        return None
    lr = series(a.metrics, "learning_rate")
    peak_lr = max((v for _, v in lr), default=None)
    return Finding(
        id="loss_stuck_at_ln2", severity="warning", title="the loss never left ln 2 = 0.693",
        evidence=f"mean loss {mean(end):.4f} over {_steps(end)} (ln 2 = {LN2:.4f}); mean |reward margin| "
                 f"{mean_margin:.4f}" + (f"; peak learning rate {peak_lr:.2g}" if peak_lr is not None else "") + ".",
        numbers={"tail_loss": _r(mean(end), 5), "tail_abs_margin": _r(mean_margin, 5), "steps": [end[0][0], end[-1][0]],
                 "peak_learning_rate": peak_lr},
        meaning="The policy still equals the reference: the DPO loss is exactly ln 2 at a margin of 0. Either the "
                "updates are too small to show (learning rate far too low, too few steps, a tiny beta), or nothing "
                "is being updated (frozen parameters, an adapter that is not trained), or chosen and rejected are "
                "the same text.",
        what_to_try=["raise train.learning_rate (DPO commonly uses 5e-7 to 5e-6 for full fine-tuning, 5e-6 to 5e-5 "
                     "with LoRA; try 10x)", "train longer (train.epochs, train.max_steps)",
                     "check train.beta is not tiny (0.1 is the usual start)",
                     "check the pairs differ: dpokit data inspect DATA"],
        source="TRL issues #1311 and #1627 (loss stays 0.6931, rewards stuck at 0)")


def chosen_logps_falling(a: RunArtifacts) -> Finding | None:
    """The chosen answers' log-prob falls below the reference's. Normal when the rejected falls faster and the
    answers did not get worse; harmful when both fall and generation quality drops."""
    if a.reference == "none":  # reference-free losses log beta * mean log-prob, not a log-ratio
        return None
    chosen = series(a.metrics, "rewards/chosen")
    if len(chosen) < MIN_ROWS:
        return None
    end = tail(chosen)
    chosen_nats = mean(end) / a.beta
    if chosen_nats > -CHOSEN_FALL_NATS:
        return None
    rejected_nats = mean(tail(series(a.metrics, "rewards/rejected"))) / a.beta
    worse = generation_worse(a.eval)
    rejected_faster = rejected_nats < chosen_nats
    numbers = {"tail_chosen_logratio_nats": _r(chosen_nats), "tail_rejected_logratio_nats": _r(rejected_nats),
               "steps": [end[0][0], end[-1][0]], "generation_worse": worse}
    evidence = (f"over {_steps(end)} the chosen answers' log-prob moved {chosen_nats:+.2f} nats from the reference's, "
                f"the rejected answers' {rejected_nats:+.2f}")
    if rejected_faster and not worse:
        checked = ("and the tuned answers did not get worse than the base's" if a.eval and a.eval.generation
                   else "(generation was not evaluated, so answer quality was not checked)")
        return Finding(
            id="chosen_logps_falling", severity="info", title="chosen log-probs fall, rejected fall faster (normal)",
            evidence=f"{evidence}; {checked}.", numbers=numbers,
            meaning="DPO only widens the gap between chosen and rejected; it does not push the chosen up. Both "
                    "usually fall, the rejected faster, and the model still improves: probability moves to answers "
                    "that are in neither set.",
            what_to_try=["nothing, if the answers read well; if they don't, see the harmful case in docs/doctor.md"],
            source="DPO author's explanation (eric-mitchell/direct-preference-optimization #32); TRL #800")
    why = worse or "the rejected answers did not fall faster than the chosen"
    return Finding(
        id="chosen_logps_falling", severity="warning", title="chosen log-probs fall, and it hurts",
        evidence=f"{evidence}; {why}.", numbers=numbers,
        meaning="The model lowers the likelihood of the good answers as much as the bad ones, or its answers got "
                "worse than the base's: probability leaks to text in neither set (often longer, repetitive or "
                "off-distribution). Common when chosen and rejected are very similar or the learning rate is high.",
        what_to_try=["add an NLL term on the chosen answers: train.sft_weight: 0.2 to 1.0 (RPO); or train.loss: "
                     "'sigmoid:1.0,sft:0.5'", "lower train.learning_rate", "raise train.beta",
                     "fewer epochs (train.epochs)"],
        source="TRL #800; LLaMA-Factory #7643 and #6153; OpenRLHF #1054; Pal et al. 2024 (Smaug, DPO-Positive); "
               "Pang et al. 2024 (RPO, the NLL term)")


def reward_accuracy_saturated(a: RunArtifacts) -> Finding | None:
    """Every training pair ranked right by a large, growing margin: DPO overfits the preference data."""
    acc = series(a.metrics, "rewards/accuracies")
    margins = series(a.metrics, "rewards/margins")
    if len(acc) < MIN_ROWS or len(margins) < MIN_ROWS:
        return None
    end_acc, end_margin = mean(tail(acc)), mean(tail(margins))
    if end_acc < SATURATED_ACCURACY or end_margin < SATURATED_MARGIN:
        return None
    first = next((s for s, v in margins if v >= SATURATED_MARGIN), margins[-1][0])
    half = margins[len(margins) // 2][1]
    held_out = ""
    numbers = {"tail_accuracy": _r(end_acc), "tail_margin": _r(end_margin), "margin_first_over_threshold_step": first,
               "margin_mid_run": _r(half), "steps": [tail(margins)[0][0], margins[-1][0]]}
    if a.eval is not None:
        held = a.eval.preference
        numbers["heldout_accuracy"] = held.implicit_reward_accuracy.value
        numbers["heldout_margin"] = held.reward_margin.value
        held_out = f"; held out: accuracy {_f(held.implicit_reward_accuracy.value)}, margin {_f(held.reward_margin.value)}"
    return Finding(
        id="reward_accuracy_saturated", severity="warning", title="reward accuracy saturated and margins exploding",
        evidence=f"training reward accuracy {end_acc:.2f} and mean margin {end_margin:.2f} over "
                 f"{_steps(tail(margins))} (margin {half:.2f} mid-run, first over {SATURATED_MARGIN} at step "
                 f"{first}){held_out}.",
        numbers=numbers,
        meaning="The model separates every training pair and keeps pushing the margin up: with preferences that are "
                "(near) deterministic the DPO optimum is an infinite margin, so beta's pull toward the reference "
                "stops working and the model overfits the preference data, drifting far from the base (watch KL and "
                "the answers).",
        what_to_try=["lower train.learning_rate", "fewer epochs (train.epochs) or steps", "raise train.beta",
                     "train.loss: ipo (bounded target margin)", "more, or more varied, preference pairs"],
        source="Azar et al. 2023 (IPO: DPO overfits deterministic preferences); Rafailov et al. 2023 (DPO)")


# --- rules: the outcome (first: they say whether the model got better) ---------------------------------------

def _outcome_numbers(a: RunArtifacts) -> dict:
    out = judge_outcome(a.eval)
    return {"win_rate": out.win_rate.value, "win_rate_ci": out.win_rate.ci, "n": out.win_rate.n,
            "score_change": out.score_change.value if out.score_change else None,
            "score_change_ci": out.score_change.ci if out.score_change else None,
            "lc_win_rate": out.lc_win_rate.value if out.lc_win_rate else None,
            "lc_win_rate_ci": out.lc_win_rate.ci if out.lc_win_rate else None}


def lost_to_base(a: RunArtifacts) -> Finding | None:
    """The tuned model lost to the base by the run's own judge: the win rate's interval is entirely below 0.5, or
    the mean judge score change's interval entirely below 0 (dpokit.eval.outcome)."""
    out = judge_outcome(a.eval)
    if out.direction != "worse":
        return None
    return Finding(
        id="lost_to_base", severity="warning", title="the tuned model lost to the base by your judge",
        evidence="; ".join(out.reasons) + ": " + out.numbers + ".", numbers=_outcome_numbers(a),
        meaning="Training made the answers worse by the measure you asked for. With the implicit-reward accuracy "
                "high at the same time, the model learned the pairs and overshot what the judge rewards (reward "
                "over-optimisation): the answers drifted (see KL) to a style the judge does not prefer, often much "
                "shorter or longer ones.",
        what_to_try=["lower train.learning_rate (e.g. 3-10x) or train fewer steps (train.max_steps, train.epochs)",
                     "raise train.beta (a stronger pull toward the base)",
                     "read the samples in the report: what did the tuned answers become?",
                     "check the pairs agree with the judge (chosen = the answer the judge scores higher)"],
        source="Gao et al. 2023 (Scaling laws for reward model overoptimization); Rafailov et al. 2024 (Scaling "
               "laws for reward model overoptimization in direct alignment algorithms); tracker issue 26")


def no_measurable_gain(a: RunArtifacts) -> Finding | None:
    """Neither the win rate's interval nor the score change's lies above its null value (0.5, 0), and neither
    below: the evaluation cannot tell the tuned model from the base."""
    out = judge_outcome(a.eval)
    if out.direction != "no_change":
        return None
    wr = out.win_rate
    return Finding(
        id="no_measurable_gain", severity="warning", title="no measurable gain over the base",
        evidence="; ".join(out.reasons) + ": " + out.numbers + ".", numbers=_outcome_numbers(a),
        meaning="The tuned model may be a little better or a little worse; with these answers the evaluation "
                "cannot tell. Either training moved the model too little, or too few prompts were judged to see "
                f"a difference (the interval is {_f(wr.ci[1] - wr.ci[0]) if _finite(wr.ci[0]) else 'n/a'} wide).",
        what_to_try=["judge more answers: eval.num_prompts (and eval.samples_per_prompt) up",
                     "if KL is near 0, the model barely moved: raise train.learning_rate or train longer",
                     "check the pairs agree with the judge (chosen = the answer the judge scores higher)"],
        source="Wilson 1927 (the interval); tracker issue 26")


def length_collapse(a: RunArtifacts) -> Finding | None:
    """The tuned answers are much shorter than the base's: mean length under LENGTH_COLLAPSE_RATIO of the base's,
    and the two means' 95% intervals do not overlap."""
    if a.eval is None or a.eval.generation is None:
        return None
    lengths = a.eval.generation.lengths
    base, tuned = lengths.base.mean, lengths.tuned.mean
    b, t = base.value, tuned.value
    if not (_finite(b) and _finite(t)) or b < MIN_COLLAPSE_BASE_TOKENS or t >= LENGTH_COLLAPSE_RATIO * b:
        return None
    apart = _finite(tuned.ci[1]) and _finite(base.ci[0]) and tuned.ci[1] < base.ci[0]
    if not apart:
        return None
    short = min(a.samples, key=lambda s: s.tuned_tokens) if a.samples else None
    return Finding(
        id="length_collapse", severity="warning", title="the tuned answers collapsed in length",
        evidence=f"mean answer length {b:.1f} [{_f(base.ci[0])}, {_f(base.ci[1])}] (base) -> {t:.1f} "
                 f"[{_f(tuned.ci[0])}, {_f(tuned.ci[1])}] (tuned) tokens, {t / b:.2f}x; flagged under "
                 f"{LENGTH_COLLAPSE_RATIO}x with the intervals apart"
                 + (f"; the shortest tuned answer: {short.tuned[:80]!r}" if short else "") + ".",
        numbers={"mean_length_base": _r(b), "mean_length_tuned": _r(t), "ratio": _r(t / b),
                 "base_ci": base.ci, "tuned_ci": tuned.ci},
        meaning="DPO found that shorter answers win the training pairs and kept going past the length the judge "
                "rewards: the answers stop early, or degenerate into a stock phrase. Common when the chosen "
                "answers are shorter than the rejected in most pairs and the learning rate is high.",
        what_to_try=["lower train.learning_rate or train fewer steps", "raise train.beta",
                     "balance lengths in the pairs (dpokit data inspect shows the chosen/rejected length bias)",
                     "a length-normalised loss (train.loss: ipo or simpo) or an NLL term: train.sft_weight: 0.2"],
        source="Park et al. 2024 (Disentangling length from quality in DPO; the same shortcut, shortening); "
               "tracker issue 26 (41 -> 8 tokens, win rate 0.17)")


# --- rules: evaluation -------------------------------------------------------------------------------------------

def kl_large(a: RunArtifacts) -> Finding | None:
    """KL(tuned || base) per token on the tuned model's own samples is large."""
    if a.eval is None or a.eval.kl is None:
        return None
    kl = a.eval.kl
    per_token = kl.per_token.value
    if per_token is None or not math.isfinite(per_token) or per_token <= KL_PER_TOKEN_LARGE:
        return None
    return Finding(
        id="kl_large", severity="warning", title="the tuned model drifted far from the base",
        evidence=f"KL(tuned || base) {per_token:.2f} nats per token ({kl.sequence.value:.1f} nats per answer, "
                 f"{kl.n_samples} samples, {kl.total_tokens} tokens); flagged above {KL_PER_TOKEN_LARGE}.",
        numbers={"kl_per_token": _r(per_token), "kl_sequence": _r(kl.sequence.value), "n_samples": kl.n_samples},
        meaning="The tuned model's answers are ones the base model finds unlikely. Some drift is the point of DPO, "
                "but past a point the judge's gains stop being real (reward over-optimisation) and fluency, "
                "knowledge and format suffer.",
        what_to_try=["raise train.beta (stronger pull toward the reference)", "lower train.learning_rate or train "
                     "fewer steps", "read the samples in the report for drift in style, length or language"],
        source="Gao et al. 2023 (Scaling laws for reward model overoptimization); Rafailov et al. 2023 (the KL-"
               "constrained objective DPO solves)")


def _bucket(a: RunArtifacts, name: str):
    return next(b for b in a.eval.generation.length_controlled.buckets if b.bucket == name)


def length_exploitation(a: RunArtifacts) -> Finding | None:
    """The tuned model wins only where its answer is longer: the judge rewards length, not quality."""
    if a.eval is None or a.eval.generation is None:
        return None
    gen = a.eval.generation
    longer, matched, shorter = _bucket(a, "tuned_longer"), _bucket(a, "length_matched"), _bucket(a, "tuned_shorter")
    by_bucket = (longer.n >= MIN_BUCKET_PAIRS and longer.win_rate.value >= LONGER_WIN_RATE
                 and matched.n >= MIN_BUCKET_PAIRS and matched.win_rate.value <= MATCHED_WIN_RATE_MAX
                 and (shorter.n < MIN_BUCKET_PAIRS or shorter.win_rate.value <= MATCHED_WIN_RATE_MAX))
    reg = gen.length_controlled.regression
    len_base, len_tuned = gen.lengths.base.mean.value, gen.lengths.tuned.mean.value
    by_regression = bool(
        reg and reg.tuned_effect.ci[0] <= 0 < reg.per_token.ci[0]
        and gen.outcomes.win_rate.value > 0.5 and len_base > 0 and len_tuned >= LENGTH_GROWTH * len_base)
    if not (by_bucket or by_regression):
        return None
    parts = [f"win rate {b.win_rate.value:.2f} among {b.bucket.replace('_', ' ')} pairs (n={b.n})"
             for b in (longer, matched, shorter) if b.n]
    if reg:
        parts.append(f"judge score at equal length {reg.tuned_effect.value:+.3f} "
                     f"[{reg.tuned_effect.ci[0]:+.3f}, {reg.tuned_effect.ci[1]:+.3f}], per extra token "
                     f"{reg.per_token.value:+.4f}")
    return Finding(
        id="length_exploitation", severity="warning", title="wins come only with longer answers",
        evidence="; ".join(parts) + f"; mean length {len_base:.1f} (base) -> {len_tuned:.1f} (tuned) tokens.",
        numbers={"buckets": {b.bucket: {"n": b.n, "win_rate": b.win_rate.value if b.n else None}
                             for b in (shorter, matched, longer)},
                 "mean_length_base": _r(len_base), "mean_length_tuned": _r(len_tuned),
                 "tuned_effect_at_equal_length": reg.tuned_effect.value if reg else None},
        meaning="Preference data and judges tend to favour longer answers, and DPO learns length as a shortcut: the "
                "win rate measures verbosity rather than quality. A gain that holds among length-matched pairs is "
                "real; this one does not.",
        what_to_try=["balance lengths in the pairs (dpokit data inspect shows the chosen/rejected length bias)",
                     "raise train.beta", "cap eval.max_new_tokens and compare again",
                     "a length-normalised loss: train.loss: simpo or ipo"],
        source="Park et al. 2024 (Disentangling length from quality in DPO); Singhal et al. 2023 (A long way to go: "
               "length correlations in RLHF)")


def distinct_n(units: list[str], n: int = DISTINCT_N) -> float | None:
    """Unique n-grams / all n-grams of a sequence of words (or characters); None under n + 1 units (too short to
    repeat anything)."""
    if len(units) < n + 1:
        return None
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return len(set(grams)) / len(grams)


def answer_units(texts: list[str]) -> list[list[str]]:
    """Whitespace words, or characters when most answers have no spaces to split on (Chinese, Japanese, or a
    tiny model's word-less output): the same unit for every answer, so base and tuned compare."""
    words = [t.split() for t in texts]
    lengths = sorted(len(w) for w in words)
    if lengths and lengths[len(lengths) // 2] >= DISTINCT_N + 1:
        return words
    return [[c for c in t if not c.isspace()] for t in texts]


def repetition(a: RunArtifacts) -> Finding | None:
    """The tuned answers repeat themselves more than the base's (distinct-2 drops)."""
    if not a.samples:
        return None
    units = answer_units([s.base for s in a.samples] + [s.tuned for s in a.samples])
    scores = [distinct_n(u) for u in units]
    base = [d for d in scores[:len(a.samples)] if d is not None]
    tuned_scores = scores[len(a.samples):]
    tuned = [d for d in tuned_scores if d is not None]
    if len(base) < MIN_REPETITION_ANSWERS or len(tuned) < MIN_REPETITION_ANSWERS:
        return None
    d_base, d_tuned = sum(base) / len(base), sum(tuned) / len(tuned)
    if d_base - d_tuned < REPETITION_DROP:
        return None
    worst = min(range(len(a.samples)), key=lambda i: 1.0 if tuned_scores[i] is None else tuned_scores[i])
    return Finding(
        id="repetition", severity="warning", title="the tuned model repeats itself",
        evidence=f"mean distinct-{DISTINCT_N} of the answers {d_base:.2f} (base) -> {d_tuned:.2f} (tuned) over "
                 f"{len(tuned)} answers; the most repetitive tuned answer starts {a.samples[worst].tuned[:80]!r}.",
        numbers={"distinct_n": DISTINCT_N, "base": _r(d_base), "tuned": _r(d_tuned), "n_answers": len(tuned)},
        meaning="Probability mass DPO moved away from the rejected answers went to loops of the same phrase: a known "
                "failure after DPO, often with a high learning rate, many epochs, or chosen log-probs falling.",
        what_to_try=["add an NLL term on the chosen answers: train.sft_weight: 0.2 to 1.0", "lower "
                     "train.learning_rate or train fewer epochs", "raise train.beta",
                     "put repetitive answers in the rejected side of new pairs"],
        source="LLaMA-Factory #7734 (repeated output after DPO); Li et al. 2016 (distinct-n)")


def eval_train_gap(a: RunArtifacts) -> Finding | None:
    """Training pairs ranked much better than held-out pairs, or the held-out loss far above the training loss."""
    acc = series(a.metrics, "rewards/accuracies")
    loss = series(a.metrics, "loss")
    eval_loss = [(r.step, float(v)) for r in a.metrics
                 if isinstance(v := r.model_dump().get("eval_loss"), (int, float)) and math.isfinite(v)]
    reasons, numbers = [], {}
    held = a.eval.preference.implicit_reward_accuracy if a.eval is not None else None
    if held is not None and _finite(held.value) and len(acc) >= MIN_ROWS:
        train_acc = mean(tail(acc))
        high = held.ci[1] if _finite(held.ci[1]) else held.value
        numbers.update(tail_train_accuracy=_r(train_acc), heldout_accuracy=held.value, heldout_ci=held.ci)
        if train_acc - held.value >= GAP_ACCURACY and high < train_acc:
            reasons.append(f"training reward accuracy {train_acc:.2f} over {_steps(tail(acc))} vs held-out "
                           f"{held.value:.2f} [{_f(held.ci[0])}, {_f(held.ci[1])}] (n={held.n})")
    if eval_loss and len(loss) >= MIN_ROWS:
        step, last = eval_loss[-1]
        train_loss = mean(tail(loss))
        numbers.update(last_eval_loss=_r(last), eval_loss_step=step, tail_train_loss=_r(train_loss))
        if last - train_loss >= GAP_LOSS:
            reasons.append(f"held-out loss {last:.3f} at step {step} vs training loss {train_loss:.3f}")
    if not reasons:
        return None
    return Finding(
        id="eval_train_gap", severity="warning", title="training pairs look much better than held-out pairs",
        evidence="; ".join(reasons) + ".", numbers=numbers,
        meaning="The model memorised the training pairs more than it learned the preference: what it learned does "
                "not carry over to pairs it has not seen. Also seen when the held-out pairs come from another "
                "distribution than the training pairs.",
        what_to_try=["fewer epochs or steps", "lower train.learning_rate", "raise train.beta or try train.loss: ipo",
                     "more training pairs; check train and held-out come from the same source (data/report.json)"],
        source="Azar et al. 2023 (IPO: DPO overfits the preference dataset); Rafailov et al. 2023 (held-out "
               "preference accuracy as the measure)")


def generation_worse(result: EvalResult | None) -> str | None:
    """Why the tuned answers are worse than the base's (win rate or judge score, 95% intervals), or None."""
    if result is None or result.generation is None:
        return None
    gen = result.generation
    wr = gen.outcomes.win_rate
    if wr.n and wr.ci[1] is not None and wr.ci[1] < 0.5:
        return f"the tuned answers lose to the base's: win rate {wr.value:.2f} [{wr.ci[0]:.2f}, {wr.ci[1]:.2f}]"
    if gen.scores:
        base, tuned = gen.scores.base, gen.scores.tuned
        if all(isinstance(x, (int, float)) and math.isfinite(x) for x in (base.ci[0], tuned.ci[1])) and \
                tuned.ci[1] < base.ci[0]:
            return f"the mean judge score fell: {base.value:.3f} (base) -> {tuned.value:.3f} (tuned)"
    return None


# --- the doctor --------------------------------------------------------------------------------------------------

Rule = Callable[[RunArtifacts], "Finding | None"]

# (rule, what it needs: "metrics" always runs; "eval" needs eval.json; "samples" needs eval_samples.jsonl).
RULES: list[tuple[Rule, str]] = [
    (lost_to_base, "eval"),              # the outcome first: did the model get better by the judge?
    (no_measurable_gain, "eval"),
    (length_collapse, "eval"),
    (nonfinite, "metrics"),
    (loss_stuck_at_ln2, "metrics"),
    (chosen_logps_falling, "metrics"),   # reads the evaluation too, when there is one
    (reward_accuracy_saturated, "metrics"),
    (kl_large, "eval"),
    (length_exploitation, "eval"),
    (repetition, "samples"),
    (eval_train_gap, "metrics"),         # eval.json's accuracy, or eval_loss rows (train.eval_steps)
]


def read_artifacts(run_dir: str | Path) -> RunArtifacts:
    """The run folder's artifacts; a folder that is not a run, or has no metrics, is a one-line UserError."""
    run = RunDir(run_dir)
    run.require_run()
    metrics = run.read_metrics()
    if not metrics:
        raise UserError(f"{run.path}: no training metrics in {run.metrics}; train the run first "
                        "(dpokit train CONFIG, or --resume it)")
    cfg = run.read_config()
    summary = run.read_train_summary()
    reference = summary.reference if summary else cfg.train.reference
    return RunArtifacts(metrics=metrics, beta=cfg.train.beta, reference=reference, eval=run.read_eval(),
                        samples=run.read_eval_samples())


def run_rules(a: RunArtifacts) -> list[Finding]:
    """Every rule whose inputs exist; an info finding `rules_skipped` names the others. Warnings first."""
    findings, skipped = [], []
    for rule, needs in RULES:
        missing = ((needs == "eval" and a.eval is None) or (needs == "samples" and not a.samples))
        if missing:
            skipped.append(rule.__name__)
            continue
        finding = rule(a)
        if finding is not None:
            findings.append(finding)
    if skipped:
        what = "no eval.json" if a.eval is None else "no eval_samples.jsonl (eval.generate: false?)"
        findings.append(Finding(
            id="rules_skipped", severity="info", title="only some rules ran",
            evidence=f"{what}: skipped {', '.join(skipped)}; the training-curve rules ran.",
            numbers={"skipped": skipped},
            meaning="These rules read the evaluation; without it the doctor can only judge the training curves.",
            what_to_try=["dpokit eval RUN_DIR (with eval.generate: true for the generation rules), then dpokit "
                         "doctor RUN_DIR again"]))
    return sorted(findings, key=lambda f: f.severity != "warning")


def diagnose(run_dir: str | Path) -> list[Finding]:
    """Read a run folder and apply every rule: the findings, warnings first."""
    return run_rules(read_artifacts(run_dir))


# The outcome rules' findings are the decision itself; the verdict names the other warnings as its causes.
OUTCOME_RULES = ("lost_to_base", "no_measurable_gain")


def verdict(findings: list[Finding], result: EvalResult | None) -> str:
    """One line that leads with the outcome: "Better: ...", "No measurable change: ...", "Worse: ..." by the
    judge (dpokit.eval.outcome.judge_outcome), then the causes: the other warnings. Without judged answers,
    "Not measured: ..." and the held-out implicit-reward accuracy."""
    causes = [f"{f.id} ({f.title})" for f in findings if f.severity == "warning" and f.id not in OUTCOME_RULES]
    outcome = judge_outcome(result, causes)
    if outcome.direction != "not_measured" or result is None:
        return outcome.line
    acc = result.preference.implicit_reward_accuracy
    said = f"held-out implicit-reward accuracy {_f(acc.value)} [{_f(acc.ci[0])}, {_f(acc.ci[1])}] (chance 0.5)"
    head = outcome.line.split(" Look at: ")[0]
    return f"{head} {said[0].upper()}{said[1:]}." + (" Look at: " + "; ".join(causes) + "." if causes else "")


def run_verdict(run_dir: str | Path) -> tuple[str, str]:
    """(verdict line, outcome direction) of a finished, evaluated run folder: what the summaries print first."""
    result = RunDir(run_dir).read_eval()
    try:
        findings = diagnose(run_dir)
    except UserError:  # no metrics: the outcome alone
        findings = []
    return verdict(findings, result), judge_outcome(result).direction


# The shapes of healthy curves, for the report's "What your curves mean" section and docs/doctor.md.
NORMAL_SHAPES: list[tuple[str, str]] = [
    ("loss", "starts at ln 2 = 0.693 (the policy equals the reference) and falls; on real data it levels off "
             "around 0.4-0.6 after an epoch. Flat at 0.693: nothing is learned; near 0: overfitting."),
    ("rewards/accuracies", "share of pairs whose chosen answer gets the larger implicit reward; 0 at step 0 (ties), "
                           "then rises, typically to 0.6-0.8 on real data. Pinned at 1.0 with a growing margin: "
                           "saturation."),
    ("rewards/margins", "beta times the log-ratio gap between chosen and rejected; grows slowly. Fast, unbounded "
                        "growth is overfitting."),
    ("rewards/chosen and rewards/rejected", "both usually fall below 0, the rejected faster: DPO widens the gap, "
                                            "it does not lift the chosen. Harmful only when answers get worse."),
    ("KL(tuned || base)", "grows with training; a few nats per answer is typical, much more than 0.5 nats per token "
                          "means the model drifted far from the base."),
]
