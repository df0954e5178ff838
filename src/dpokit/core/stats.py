"""Confidence intervals used across evaluation."""

from __future__ import annotations

import math

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


def proportion(flags: list[bool]) -> dict:
    n = len(flags)
    k = sum(bool(f) for f in flags)
    low, high = wilson_interval(k, n)
    return {"value": k / n if n else float("nan"), "ci": [low, high], "n": n}


def interval(values: list[float]) -> dict:
    """{value, ci, n}: the mean of `values` with its normal 95% interval."""
    mean, low, high = mean_interval(values)
    return {"value": mean, "ci": [low, high], "n": len(values)}
