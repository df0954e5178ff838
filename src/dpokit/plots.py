"""Plots for the reports: matplotlib figures rendered to PNG bytes (Agg backend, no display needed).

Each function takes plain data read from a run folder's artifacts (or a sweep's / iterate's rows) and returns the
PNG; `dpokit.report` inlines them in the HTML and writes them next to the Markdown.
"""

from __future__ import annotations

import io
import math

import numpy as np


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def training_curves(rows: list[dict]) -> bytes | None:
    """Loss, implicit-reward accuracy, margin, chosen/rejected rewards against the optimizer step."""
    rows = [r for r in rows if "loss" in r and "step" in r]
    if not rows:
        return None
    panels = [("loss", ["loss"]), ("rewards/accuracies", ["rewards/accuracies"]),
              ("rewards/margins", ["rewards/margins"]), ("rewards", ["rewards/chosen", "rewards/rejected"])]
    fig, axes = _figure(4, 3.4, 2.8)
    for ax, (title, keys) in zip(axes, panels, strict=False):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=False), marker=".", label=key.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    return _png(fig)


def length_histograms(lengths: dict) -> bytes:
    edges = lengths["histogram_edges"]
    fig, axes = _figure(1, 6, 3.2)
    ax = axes[0]
    for who, color in (("base", "#8899aa"), ("tuned", "#dd6633")):
        ax.hist(lengths[who]["values"], bins=edges, alpha=0.6, label=f"{who} (mean {lengths[who]['mean']['value']:.1f})",
                color=color)
    ax.set_xlabel(f"answer length ({lengths['unit']})")
    ax.set_ylabel("answers")
    ax.legend()
    return _png(fig)


def score_distributions(scores: dict) -> bytes:
    fig, axes = _figure(1, 6, 3.2)
    ax = axes[0]
    values = scores["base_values"] + scores["tuned_values"]
    edges = np.histogram_bin_edges(values, bins=12 if len(set(values)) > 1 else 1,
                                   range=(min(values), max(values) + 1e-9))  # one set of bins for both models
    for who, color in (("base", "#8899aa"), ("tuned", "#dd6633")):
        ax.hist(scores[f"{who}_values"], bins=edges, alpha=0.6, label=f"{who} (mean {scores[who]['value']:.3f})",
                color=color)
    ax.set_xlabel("judge score")
    ax.set_ylabel("answers")
    ax.legend()
    return _png(fig)


def outcome_bars(outcomes: dict, buckets: list[dict]) -> bytes:
    """Win/tie/loss shares overall and per length bucket, stacked."""
    groups = [("all", outcomes["wins"], outcomes["ties"], outcomes["losses"])]
    groups += [(b["bucket"].replace("_", " "), b["wins"], b["ties"], b["losses"]) for b in buckets if b["n"]]
    fig, axes = _figure(1, 6, 3.0)
    ax = axes[0]
    labels = [g[0] for g in groups]
    totals = [max(sum(g[1:]), 1) for g in groups]
    left = [0.0] * len(groups)
    for k, (name, color) in enumerate((("win", "#3a9d5d"), ("tie", "#bbbbbb"), ("loss", "#c44e52"))):
        shares = [g[k + 1] / t for g, t in zip(groups, totals, strict=False)]
        ax.barh(labels, shares, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, shares, strict=False)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of judged pairs (tuned vs base)")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def frontier_plot(rows: list[dict], y_label: str) -> bytes:
    """Reward (judge score of the tuned model) against KL(tuned||base), one point per run."""
    fig, axes = _figure(1, 6, 4)
    ax = axes[0]
    pts = [r for r in rows if finite(r.get("kl")) and finite(r.get("reward"))]
    base = next((r["base_reward"] for r in rows if finite(r.get("base_reward"))), None)
    if base is not None:  # the starting point of every run: the base model, at KL 0 from itself
        ax.plot([0.0], [base], marker="s", color="black", linestyle="none", label="base model (KL 0)")
        ax.annotate("base", (0.0, base), textcoords="offset points", xytext=(5, -12), fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
    for r in pts:
        xerr = _yerr(r["kl"], r.get("kl_ci"))
        yerr = _yerr(r["reward"], r.get("reward_ci"))
        ax.errorbar(r["kl"], r["reward"], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.annotate(r["label"], (r["kl"], r["reward"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if len(pts) > 1:
        ordered = sorted(pts, key=lambda r: r["kl"])
        ax.plot([r["kl"] for r in ordered], [r["reward"] for r in ordered], "--", color="#999", linewidth=1)
    ax.set_xlabel("KL(tuned || base) per answer (nats)")
    ax.set_ylabel(y_label)
    ax.set_title("reward vs KL frontier")
    return _png(fig)


def finite(x) -> bool:
    """A real number (not None, not nan or inf)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def _yerr(value, ci):
    if not ci or not all(finite(c) for c in ci):
        return None
    return [[max(value - ci[0], 0)], [max(ci[1] - value, 0)]]


def iterate_curves(rounds: list[dict], offline: dict | None, initial: dict | None) -> bytes:
    """Mean judge score, win rate vs pi0 and KL from pi0 against the round (round 0 = pi0); the offline arm as a
    dashed line at its value."""
    panels = [("mean_score", "mean judge score, tuned"), ("win_rate_vs_initial", "win rate vs pi0"),
              ("kl_from_initial", "KL from pi0 per answer (nats)")]
    fig, axes = _figure(3, 3.6, 3.0)
    start = {"mean_score": (initial or {}).get("mean_score"), "win_rate_vs_initial": 0.5, "kl_from_initial": 0.0}
    for ax, (key, title) in zip(axes, panels, strict=True):
        pts = [(0, start[key], None)] if finite(start[key]) else []
        pts += [(r["round"], r[key], r.get(f"{key}_ci")) for r in rounds if finite(r.get(key))]
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            errs = [_yerr(y, ci) or [[0], [0]] for _, y, ci in pts]
            ax.errorbar(xs, ys, yerr=[[e[0][0] for e in errs], [e[1][0] for e in errs]], marker="o", capsize=3,
                        label="iterative")
        if offline and finite(offline.get(key)):
            ax.axhline(offline[key], color="#c44e52", linestyle="--", label="offline arm")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round (0 = pi0)")
        ax.set_xticks(range(0, len(rounds) + 1))
        if offline:
            ax.legend(fontsize=7)
    return _png(fig)
