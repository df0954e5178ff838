"""The outcome of a run, first: did the tuned model get better than the base by the user's own judge?

Entry point: `judge_outcome(result, causes) -> Outcome`. It decides from two 95% intervals in eval.json:

- the win rate of the tuned answers over the base answers (`generation.outcomes.win_rate`, Wilson; a tie is 1/2),
  against 0.5;
- with a pointwise judge, the change of the mean judge score, tuned - base, paired by prompt and seed (the mean of
  the per-answer differences, normal interval), against 0.

**worse** when either interval lies entirely below (win rate < 0.5, or score change < 0); **better** when either
lies entirely above and neither below; otherwise **no measurable change** (the intervals include 0.5 and 0).
Without judged answers (eval.generate: false) the outcome is **not measured**. The one-line `Outcome.line` leads
with the decision, then its numbers (and the length-controlled win rate), then the causes the caller names (the
doctor's warnings). It is the first line of `dpokit doctor`, the report and the quickstart and iterate summaries.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from dpokit.core.run import EvalResult, Metric
from dpokit.core.stats import interval

Direction = Literal["better", "no_change", "worse", "not_measured"]

HEADLINE = {"better": "Better", "no_change": "No measurable change", "worse": "Worse", "not_measured": "Not measured"}


class Outcome(BaseModel):
    """The decision and what it rests on."""

    direction: Direction = Field(description="better, no_change, worse, or not_measured (no judged answers)")
    line: str = Field(description="one line: the decision, its numbers, then the causes")
    win_rate: Metric | None = Field(None, description="tuned vs base win rate (tie = 1/2), Wilson 95% interval")
    score_change: Metric | None = Field(None, description="mean judge score tuned - base, paired, normal interval")
    lc_win_rate: Metric | None = Field(None, description="length-controlled win rate (equal length)")
    reasons: list[str] = Field(default_factory=list, description="which interval decided, in words")
    numbers: str = Field("", description="the numbers the decision rests on, as a clause")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _ci(m: Metric, signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    parts = [fmt.format(x) if _finite(x) else "n/a" for x in (m.value, *m.ci)]
    return f"{parts[0]} [{parts[1]}, {parts[2]}]"


def score_change(result: EvalResult) -> Metric | None:
    """Mean of tuned - base judge scores, paired answer by answer (same prompt and seed), with its 95% interval;
    None for a pairwise judge."""
    gen = result.generation
    if gen is None or not gen.scores:
        return None
    tuned, base = gen.scores.tuned_values, gen.scores.base_values
    if not tuned or not base or len(tuned) != len(base):
        return None
    return Metric.model_validate(interval([t - b for t, b in zip(tuned, base, strict=True)]))


def _side(m: Metric | None, centre: float) -> int:
    """+1 when the interval lies entirely above `centre`, -1 entirely below, 0 otherwise (or unknown)."""
    if m is None or m.n == 0 or not all(_finite(x) for x in m.ci):
        return 0
    low, high = m.ci
    return 1 if low > centre else -1 if high < centre else 0


def _decide(wr: Metric, delta: Metric | None) -> tuple[Direction, list[str]]:
    sides = {"win rate": (_side(wr, 0.5), "0.5"), "judge score change": (_side(delta, 0.0), "0")}
    below = [f"the {name}'s interval is entirely below {c}" for name, (s, c) in sides.items() if s < 0]
    above = [f"the {name}'s interval is entirely above {c}" for name, (s, c) in sides.items() if s > 0]
    if below:
        return "worse", below
    if above:
        return "better", above
    return "no_change", ["the win rate's interval includes 0.5" + (" and the score change's includes 0"
                                                                   if delta is not None else "")]


def _numbers(result: EvalResult, wr: Metric, delta: Metric | None, lc: Metric | None) -> str:
    gen = result.generation
    said = f"win rate {_ci(wr)} vs 0.5 ({gen.outcomes.wins} won, {gen.outcomes.ties} tied, {gen.outcomes.losses} lost)"
    if delta is not None:
        said += (f"; mean judge score {gen.scores.base.value:.2f} -> {gen.scores.tuned.value:.2f}, "
                 f"change {_ci(delta, signed=True)}")
    if lc is not None:
        said += f"; length-controlled win rate {_ci(lc)}"
    return said


def judge_outcome(result: EvalResult | None, causes: list[str] | None = None) -> Outcome:
    """Better / no measurable change / worse by the judge (module docstring), as one line that names `causes`
    (e.g. the doctor's warnings, "id (title)") after the decision."""
    causes = list(causes or [])
    if result is None or result.generation is None:
        why = "no eval.json" if result is None else "no judged answers (eval.generate: false)"
        line = f"Not measured: {why}, so whether the tuned model beats the base was not checked."
        return Outcome(direction="not_measured", line=line + (" Look at: " + "; ".join(causes) + "." if causes
                                                               else ""))
    gen = result.generation
    wr = gen.outcomes.win_rate
    delta = score_change(result)
    lc_fit = gen.length_controlled.win_rate
    lc = Metric(value=lc_fit.value, ci=list(lc_fit.ci), n=lc_fit.n) if lc_fit is not None else None
    direction, reasons = _decide(wr, delta)
    verb = {"better": "the tuned model beat the base", "worse": "the tuned model lost to the base",
            "no_change": "the tuned model is not measurably different from the base"}[direction]
    numbers = _numbers(result, wr, delta, lc)
    line = f"{HEADLINE[direction]}: {verb} by the judge {gen.judge.name} on {gen.n_samples} answers: {numbers}."
    if direction == "better" and lc is not None and _side(lc, 0.5) <= 0:
        line += " The length-controlled win rate's interval reaches 0.5: the gain may be length, not quality."
    if causes:
        line += (" Also look at: " if direction == "better" else " Causes: ") + "; ".join(causes) + "."
    elif direction == "better":
        line += " No rule flagged a problem."
    else:
        line += " No rule names a cause: read the samples in the report."
    return Outcome(direction=direction, line=line, win_rate=wr, score_change=delta, lc_win_rate=lc, reasons=reasons,
                   numbers=numbers)


__all__ = ["Outcome", "judge_outcome", "score_change"]
