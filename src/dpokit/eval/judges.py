"""Judges score responses. A pointwise judge maps (prompt, response) -> float; higher is better.

Registry: JUDGES name -> factory(options dict) -> judge with `.score(prompts, responses) -> list[float]`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SentimentJudge:
    """VADER's compound sentiment score (-1 .. 1) of the response; offline lexicon. Prompt is ignored."""

    def __post_init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        return [self._analyzer.polarity_scores(r)["compound"] for r in responses]


JUDGES = {"sentiment": lambda options: SentimentJudge()}


def build_judge(name: str, options: dict | None = None):
    from dpokit.errors import UserError

    if name not in JUDGES:
        raise UserError(f"eval.judge: unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    return JUDGES[name](options or {})
