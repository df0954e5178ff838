"""Generation metrics: win/tie/loss with intervals, response lengths, a length-controlled view, KL(tuned||base).

All functions take plain lists, so each can be checked against a hand computation, and return the typed records
eval.json stores (`dpokit.core.run`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dpokit.core.run import (
    Coefficient,
    LengthBucket,
    LengthControlledWinRate,
    LengthStats,
    LengthSummary,
    ScoreLengthRegression,
)
from dpokit.core.stats import (  # shared with training's checkpoint selection (dpokit.train.select)
    Z95,
    interval,
    kl_summary,
    outcome_summary,
    ratio_interval,
    wilson_interval,
    win_rate_metric,
)


def histogram_edges(values: list[float], bins: int = 10) -> list[float]:
    """Integer-aligned edges covering all values, shared by base and tuned so their histograms compare."""
    if not values:
        return [0.0, 1.0]
    low, high = math.floor(min(values)), math.ceil(max(values))
    if high <= low:
        high = low + 1
    step = max(1, math.ceil((high - low) / bins))
    edges = list(range(low, high + step, step))
    if edges[-1] <= max(values):  # the last bin includes its right edge, but make room anyway
        edges.append(edges[-1] + step)
    return [float(e) for e in edges]


def histogram(values: list[float], edges: list[float]) -> list[int]:
    """Counts per [edge_k, edge_k+1) bin; the last bin is closed on the right (numpy.histogram)."""
    return [int(c) for c in np.histogram(np.asarray(values, dtype=float), bins=np.asarray(edges, dtype=float))[0]]


def length_summary(base: list[int], tuned: list[int], bins: int = 10) -> LengthSummary:
    """Mean (with interval), median and a histogram on shared edges, for each model's answer lengths (tokens)."""
    edges = histogram_edges([*base, *tuned], bins)

    def stats(vals: list[int]) -> LengthStats:
        return LengthStats(mean=interval([float(v) for v in vals]),
                           median=float(np.median(vals)) if vals else float("nan"),
                           min=min(vals) if vals else None, max=max(vals) if vals else None,
                           histogram=histogram(vals, edges), values=list(vals))

    return LengthSummary(histogram_edges=edges, base=stats(base), tuned=stats(tuned))


BUCKETS = ("tuned_shorter", "length_matched", "tuned_longer")


def length_bucket(len_tuned: int, len_base: int, tolerance: float) -> str:
    """length_matched when the two answers differ by at most `tolerance` of the longer one."""
    if abs(len_tuned - len_base) <= tolerance * max(len_tuned, len_base):
        return "length_matched"
    return "tuned_longer" if len_tuned > len_base else "tuned_shorter"


def length_buckets(outcomes: list[int | None], len_tuned: list[int], len_base: list[int],
                   tolerance: float) -> list[LengthBucket]:
    """Win/tie/loss of tuned vs base within each length bucket: a win rate that holds within length_matched is not
    a verbosity effect."""
    groups: dict[str, list[int | None]] = {name: [] for name in BUCKETS}
    for o, lt, lb in zip(outcomes, len_tuned, len_base, strict=False):
        groups[length_bucket(lt, lb, tolerance)].append(o)
    rows = []
    for name in BUCKETS:
        s = outcome_summary(groups[name])
        rows.append(LengthBucket(bucket=name, n=s.n, wins=s.wins, ties=s.ties, losses=s.losses,
                                 unparseable=s.unparseable, win_rate=s.win_rate))
    return rows


def score_length_regression(scores_tuned: list[float], scores_base: list[float], len_tuned: list[int],
                            len_base: list[int]) -> ScoreLengthRegression | None:
    """OLS of judge score on [1, length, is_tuned] over all answers of both models: `tuned_effect` is the score
    gain of the tuned model at equal length, `per_token` the score change per extra token. Normal 95% intervals
    from the classical OLS standard errors. None when the design is degenerate (too few answers or no length
    variation)."""
    y = torch.tensor(scores_tuned + scores_base, dtype=torch.float64)
    length = torch.tensor(len_tuned + len_base, dtype=torch.float64)
    tuned = torch.tensor([1.0] * len(scores_tuned) + [0.0] * len(scores_base), dtype=torch.float64)
    X = torch.stack([torch.ones_like(y), length, tuned], dim=1)
    n, k = X.shape
    if n <= k:
        return None
    xtx = X.T @ X
    if torch.linalg.matrix_rank(xtx) < k:
        return None
    inv = torch.linalg.inv(xtx)
    beta = inv @ X.T @ y
    resid = y - X @ beta
    sigma2 = float(resid @ resid) / (n - k)
    se = torch.sqrt(torch.clamp(torch.diag(inv) * sigma2, min=0.0))

    def coef(j) -> Coefficient:
        b, s = float(beta[j]), float(se[j])
        return Coefficient(value=b, ci=[b - Z95 * s, b + Z95 * s], se=s)

    return ScoreLengthRegression(model="score ~ 1 + length_tokens + is_tuned (OLS)", n=n, intercept=coef(0),
                                 per_token=coef(1), tuned_effect=coef(2))


# Length-controlled win rate: the slope's Gaussian prior (a ridge penalty of LC_RIDGE * slope^2 / 2 on the
# log-likelihood). Without it the fit diverges when the few losses are all the longest (or shortest) answers
# (complete separation), which a run with a win rate near 0.99 often has. 1.0 on the standardized length
# difference is weak: 100 judged pairs carry ~25x more information about the slope.
LC_RIDGE = 1.0


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _fit_logistic(y: list[float], z: list[float], ridge: float) -> tuple[float, float, list[list[float]]] | None:
    """Newton's method for logit p_i = a + b z_i on fractional targets y_i in [0, 1] (a tie is 1/2), maximising
    sum y log p + (1 - y) log(1 - p) - ridge b^2 / 2. Returns (a, b, covariance = inverse negative Hessian), or None
    when it does not converge (separation with ridge 0)."""
    a = b = 0.0
    for _ in range(100):
        p = [_sigmoid(a + b * zi) for zi in z]
        w = [pi * (1 - pi) for pi in p]
        g_a = sum(yi - pi for yi, pi in zip(y, p, strict=True))
        g_b = sum((yi - pi) * zi for yi, pi, zi in zip(y, p, z, strict=True)) - ridge * b
        h_aa, h_ab = sum(w), sum(wi * zi for wi, zi in zip(w, z, strict=True))
        h_bb = sum(wi * zi * zi for wi, zi in zip(w, z, strict=True)) + ridge
        det = h_aa * h_bb - h_ab * h_ab
        if det <= 1e-300:
            return None
        step_a, step_b = (h_bb * g_a - h_ab * g_b) / det, (h_aa * g_b - h_ab * g_a) / det
        a, b = a + step_a, b + step_b
        if abs(a) > 50 or abs(b) > 50:
            return None
        if abs(step_a) < 1e-12 and abs(step_b) < 1e-12:
            return a, b, [[h_bb / det, -h_ab / det], [-h_ab / det, h_aa / det]]
    return None


def length_controlled_win_rate(outcomes: list[int | None], len_tuned: list[int], len_base: list[int],
                               ridge: float = LC_RIDGE, z95: float = Z95) -> LengthControlledWinRate | None:
    """The win rate the judge would give at equal answer length (AlpacaEval 2's length-controlled win rate, with
    the length term only).

    Fit logit P(tuned preferred) = a + b * z over the judged pairs, where y = 1 (win), 1/2 (tie), 0 (loss) and
    z = (len_tuned - len_base) / sd, sd the population standard deviation of the length differences (not centred:
    z = 0 is equal length). The length-controlled win rate is the prediction at z = 0, sigmoid(a); its 95% interval
    is the delta method on the logit scale, sigmoid(a -+ 1.96 se(a)), se(a) from the inverse negative Hessian
    (observed information) of the penalised log-likelihood (`ridge` on b only). Unparseable outcomes are left out.
    When every outcome is the same (a diverges) the raw win rate and its Wilson interval are returned; when the
    length differences do not vary, the length effect cannot be separated: intercept only if they are all zero,
    else None."""
    pairs = [(o, lt - lb) for o, lt, lb in zip(outcomes, len_tuned, len_base, strict=False) if o is not None]
    n = len(pairs)
    if n == 0:
        return None
    y = [(o + 1) / 2 for o, _ in pairs]
    d = [float(x) for _, x in pairs]
    centre = sum(d) / n
    sd = math.sqrt(sum((x - centre) ** 2 for x in d) / n)
    raw = win_rate_metric(sum(o == 1 for o, _ in pairs), sum(o == 0 for o, _ in pairs), n)
    base = {"n": n, "ridge": ridge, "length_diff_sd": sd, "intercept": None, "slope": None}
    if len(set(y)) == 1:
        return LengthControlledWinRate(**base, value=raw.value, ci=raw.ci,
                                       method="every outcome equal: the raw win rate")
    if sd == 0 and any(d):
        return None
    z = [x / sd for x in d] if sd > 0 else [0.0] * n
    fit = _fit_logistic(y, z, ridge if sd > 0 else 1.0)
    if fit is None:
        return None
    a, b, cov = fit
    se = math.sqrt(max(cov[0][0], 0.0))
    return LengthControlledWinRate(**{**base, "intercept": a, "slope": b if sd > 0 else None}, value=_sigmoid(a),
                                   ci=[_sigmoid(a - z95 * se), _sigmoid(a + z95 * se)],
                                   method="logistic regression on the standardized length difference")


__all__ = ["kl_summary", "length_buckets", "length_controlled_win_rate", "length_summary", "outcome_summary",
           "ratio_interval", "score_length_regression", "wilson_interval"]
