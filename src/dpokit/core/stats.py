"""Confidence intervals used across evaluation (and training's checkpoint selection): proportions, means, win
rates of judged outcomes, ratio estimators and the Monte-Carlo KL. Each returns the typed record eval.json stores
(`dpokit.core.run.Metric`, `Outcomes`, `KL`)."""

from __future__ import annotations

import math

from dpokit.core.run import KL, Metric, Outcomes

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (well-behaved near 0 and 1 and for small n)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): normal-approximation interval of the mean."""
    n = len(values)
    if n == 0:
        return (float("nan"),) * 3
    mean = sum(values) / n
    if n == 1:
        return (mean, float("nan"), float("nan"))
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (mean, mean - half, mean + half)


def proportion(flags: list[bool]) -> Metric:
    """The share of true flags with Wilson's 95% interval."""
    n = len(flags)
    k = sum(bool(f) for f in flags)
    low, high = wilson_interval(k, n)
    return Metric(value=k / n if n else float("nan"), ci=[low, high], n=n)


def interval(values: list[float]) -> Metric:
    """The mean of `values` with its normal 95% interval."""
    mean, low, high = mean_interval(values)
    return Metric(value=mean, ci=[low, high], n=len(values))


def win_rate_metric(wins: int, ties: int, n: int) -> Metric:
    low, high = wilson_interval(wins + 0.5 * ties, n)
    return Metric(value=(wins + 0.5 * ties) / n if n else float("nan"), ci=[low, high], n=n)


def outcome_summary(outcomes: list[int | None]) -> Outcomes:
    """Counts and rates of +1 (win), 0 (tie), -1 (loss) over the parsed outcomes; None (unparseable) is counted and
    excluded. win_rate scores a tie as half a win; its interval is Wilson's on (wins + ties/2) of n, which, unlike a
    normal interval, keeps a width when every outcome is the same (10 wins of 10 is not certainty)."""
    parsed = [o for o in outcomes if o is not None]
    wins, ties, losses = (sum(o == v for o in parsed) for v in (1, 0, -1))
    return Outcomes(n=len(parsed), wins=wins, ties=ties, losses=losses, unparseable=len(outcomes) - len(parsed),
                    win=proportion([o == 1 for o in parsed]), tie=proportion([o == 0 for o in parsed]),
                    loss=proportion([o == -1 for o in parsed]), win_rate=win_rate_metric(wins, ties, len(parsed)))


def ratio_interval(numerators: list[float], denominators: list[float], z: float = Z95) -> Metric:
    """sum(y) / sum(x) with a delta-method interval (the usual ratio-estimator variance)."""
    n = len(numerators)
    total_x = sum(denominators)
    if n == 0 or total_x == 0:
        return Metric(value=float("nan"), ci=[float("nan"), float("nan")], n=n)
    r = sum(numerators) / total_x
    if n == 1:
        return Metric(value=r, ci=[float("nan"), float("nan")], n=n)
    mean_x = total_x / n
    resid = [y - r * x for y, x in zip(numerators, denominators, strict=False)]
    var = sum(e * e for e in resid) / (n - 1) / (n * mean_x * mean_x)
    half = z * math.sqrt(var)
    return Metric(value=r, ci=[r - half, r + half], n=n)


def kl_summary(logp_tuned: list[float], logp_base: list[float], n_tokens: list[int],
               exact_sampling: bool = True) -> KL:
    """Monte-Carlo KL(tuned || base) from samples y ~ pi_tuned: the mean over samples of
    sum_t [log pi_tuned(y_t|...) - log pi_base(y_t|...)], with a 95% interval; per token: total log-ratio over
    total tokens. `exact_sampling`: the samples were drawn at temperature 1 and top_p 1 (otherwise biased)."""
    diffs = [t - b for t, b in zip(logp_tuned, logp_base, strict=False)]
    return KL(n_samples=len(diffs), total_tokens=int(sum(n_tokens)), sequence=interval(diffs),
              per_token=ratio_interval(diffs, [float(n) for n in n_tokens]), exact_sampling=exact_sampling)
