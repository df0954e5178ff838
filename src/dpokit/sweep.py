"""Sweeps: one training run per value of a swept key, then a reward-vs-KL frontier report.

`dpokit sweep CONFIG --set train.beta=0.05,0.1,0.5` -> runs OUTPUT_DIR/train.beta=0.05, ... in sequence (each with
its evaluation), then OUTPUT_DIR/sweep.json, sweep.html and sweep.md. Several comma-valued keys sweep their product.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from dpokit.core.config import load_config, parse_override
from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text
from dpokit.core.run import RunDir, format_interval
from dpokit.eval import evaluate_run
from dpokit.pipeline import render_table
from dpokit.report import write_sweep_report
from dpokit.train.plan import plan_training
from dpokit.train.trainer import run_training


def split_overrides(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(fixed overrides, [(key, [value, ...]) swept]): a value with commas is a list of values to sweep."""
    fixed, swept = [], []
    for item in overrides or []:
        parts, _ = parse_override(item)  # validates the shape
        key, _, value = item.partition("=")
        if "," in value and not value.strip().startswith(("[", "{")):
            values = [v.strip() for v in value.split(",") if v.strip()]
            swept.append((".".join(parts), values))
        else:
            fixed.append(item)
    return fixed, swept


def sweep_points(swept: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination of swept values, as lists of `key=value` overrides."""
    keys = [k for k, _ in swept]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=False)] for combo in itertools.product(*(vals for _, vals in swept))]


def format_sweep_table(rows: list[dict]) -> str:
    """The closing table: one line per run, the frontier's numbers with their intervals."""
    cell = format_interval

    header = ["run", "KL per answer [95% CI]", (rows[0].get("reward_kind") or "reward") if rows else "reward",
              "implicit-reward accuracy"]
    body = [[r["label"], cell(r["kl"], r["kl_ci"]), cell(r["reward"], r["reward_ci"]), cell(r["accuracy"])]
            for r in rows]
    return render_table(header, body)


def summarize_run(run_dir: Path, label: str) -> dict:
    """One frontier point: KL(tuned||base) per answer and the tuned model's reward (mean judge score; the win rate
    for pairwise judges), with their intervals."""
    result = RunDir(run_dir).require_eval()
    row = {"label": label, "run_dir": str(run_dir), "kl": None, "kl_ci": None, "reward": None, "reward_ci": None,
           "reward_kind": None, "base_reward": None, "accuracy": result.preference.implicit_reward_accuracy.value}
    gen, kl = result.generation, result.kl
    if kl:
        row.update(kl=kl.sequence.value, kl_ci=kl.sequence.ci)
    if gen:
        judge = gen.judge.name
        if gen.scores:
            tuned = gen.scores.tuned
            row.update(reward=tuned.value, reward_ci=tuned.ci, reward_kind=f"mean {judge} score, tuned",
                       base_reward=gen.scores.base.value)
        else:  # the base model against itself wins half the time
            rate = gen.outcomes.win_rate
            row.update(reward=rate.value, reward_ci=rate.ci, reward_kind=f"win rate vs base ({judge})", base_reward=0.5)
    return row


def run_sweep(config: str, overrides: list[str], overwrite: bool = False, progress: bool = False) -> Path:
    """Train and evaluate each point in turn; `progress` prints which run is which and each run's training lines."""
    fixed, swept = split_overrides(overrides)
    if not swept:
        raise UserError("dpokit sweep: no swept key; give comma-separated values, e.g. --set train.beta=0.05,0.1,0.5")
    base = load_config(config, fixed)
    sweep_dir = Path(base.output.dir).expanduser()
    points = sweep_points(swept)
    # Validate every point's config before the first (slow) run starts.
    configs = []
    for point in points:
        label = ",".join(point)
        extra = fixed + point + [f"output.dir={sweep_dir / label}", "eval.enabled=true"]
        if overwrite:
            extra.append("output.overwrite=true")
        cfg = load_config(config, extra)
        if not cfg.eval.generate:
            raise UserError("eval.generate: a sweep needs generation (KL and judge scores); drop eval.generate=false")
        configs.append((label, plan_training(cfg, evaluate=True, origin=f"{config} ({label})")))
    rows = []
    for i, (label, plan) in enumerate(configs, 1):
        if progress:
            print(f"\n== sweep run {i}/{len(configs)}: {label} -> {plan.run_dir.path}", flush=True)
        result = run_training(plan, progress=progress)
        evaluate_run(result.run_dir)
        rows.append(summarize_run(result.run_dir, label))
    y_label = next((r["reward_kind"] for r in rows if r["reward_kind"]), "reward")
    atomic_write_text(sweep_dir / "sweep.json", json.dumps({"config": str(config), "fixed": fixed,
                                                            "swept": dict(swept), "runs": rows}, indent=2))
    return write_sweep_report(sweep_dir, rows, y_label)
