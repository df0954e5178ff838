"""`dpokit quickstart`: the whole pipeline on SmolLM2-135M-Instruct, offline, on a CPU, in minutes.

Stages: (1) sample answers to bundled prompts and keep best-vs-worst by sentiment (on-policy pairs), (2) train DPO
with LoRA, (3) evaluate on held-out prompts (win rate vs base, sentiment, KL, implicit-reward accuracy, lengths),
(4) write the HTML report, (5) print a summary and write OUT/summary.json.

Every setting comes from a run config (configs/quickstart.yaml) whose `pairs` section drives stage 1; the
pairs are cached under the dpokit cache keyed by model + prompts + settings, and a finished training run in OUT
is reused when its config is unchanged, so a re-run only redoes what changed (`--fresh` redoes everything).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text, write_jsonl
from dpokit.core.judges import check_judge
from dpokit.core.run import EvalResult, TrainSummary, format_interval
from dpokit.data.generate import model_identity, pair_settings, read_prompts, split_prompts
from dpokit.eval import evaluate_run
from dpokit.eval.doctor import run_verdict
from dpokit.eval.outcome import score_change
from dpokit.pipeline import (
    bundled_config_path,
    claim_out_dir,
    load_generating_config,
    sample_best_vs_worst,
    train_unless_finished,
)
from dpokit.report import write_report
from dpokit.train.plan import plan_training

PLACEHOLDER_SOURCE = "quickstart-generated-pairs"


def default_config_path() -> Path:
    return bundled_config_path("quickstart.yaml")


def load_quickstart_config(path: str | Path | None, overrides: list[str] | None = None):
    """A run config whose data.source is filled in later with the generated pairs."""
    return load_generating_config(path, "quickstart.yaml", "quickstart", PLACEHOLDER_SOURCE, overrides)


def stage_pairs(cfg, train_prompts: list, held_prompts: list, out: Path, fresh: bool, console) -> dict:
    """Generated pairs in OUT/pairs/{train,eval}.jsonl, from the cache when the same settings were run before."""
    from dpokit.core.models import cache_dir
    from dpokit.data.generate import as_chat, settings_key

    settings = pair_settings(cfg)
    key = settings_key(json.dumps(model_identity(cfg), sort_keys=True), [train_prompts, held_prompts], cfg.pairs,
                       **settings)
    cached = cache_dir() / "pairs" / key
    if fresh or not (cached / "stats.json").is_file():
        pairs, stats, tokenizer = sample_best_vs_worst(cfg, train_prompts + held_prompts, console,
                                                       "1/4 sampling answers")
        held_chat = {json.dumps(as_chat(p, tokenizer), sort_keys=True) for p in held_prompts}
        train_pairs = [p for p in pairs if json.dumps(p["prompt"], sort_keys=True) not in held_chat]
        eval_pairs = [p for p in pairs if json.dumps(p["prompt"], sort_keys=True) in held_chat]
        stats.update(key=key, train_pairs=len(train_pairs), eval_pairs=len(eval_pairs),
                     train_prompts=len(train_prompts), eval_prompts=len(held_prompts))
        if not train_pairs or not eval_pairs:
            raise UserError(f"pairs: {len(train_pairs)} training and {len(eval_pairs)} held-out pairs; lower "
                            "pairs.min_gap or raise pairs.num_samples")
        write_jsonl(cached / "train.jsonl", train_pairs)
        write_jsonl(cached / "eval.jsonl", eval_pairs)
        atomic_write_text(cached / "stats.json", json.dumps(stats, indent=2))
    else:
        console.print(f"1/4 pairs: reusing cached pairs {cached}")
        stats = json.loads((cached / "stats.json").read_text(encoding="utf-8"))
        stats["cached"] = True
    for name in ("train.jsonl", "eval.jsonl", "stats.json"):
        (out / "pairs").mkdir(exist_ok=True)
        shutil.copyfile(cached / name, out / "pairs" / name)
    return stats


def stage_train(cfg, out: Path, fresh: bool, console) -> TrainSummary:
    """Train unless OUT/run already holds a finished run of this exact config and these pairs."""
    cfg.data.source = str((out / "pairs" / "train.jsonl").resolve())
    cfg.data.eval_source = str((out / "pairs" / "eval.jsonl").resolve())
    cfg.output.dir = str(out / "run")
    cfg.output.overwrite = True
    run, _ = train_unless_finished(cfg, refresh_reference=fresh, say=lambda text: console.print(f"2/4 {text}"))
    return run.read_train_summary()


def stage_report(run_dir: Path) -> str:
    return str(write_report(run_dir))


def summarize(ev: EvalResult, stats: dict, train_summary: TrainSummary, stage_seconds: dict, report: str | None) -> dict:
    gen, kl, pref = ev.generation, ev.kl, ev.preference
    outcomes = gen.outcomes if gen else None
    scores = gen.scores if gen else None
    lc = gen.length_controlled.win_rate if gen else None
    delta = score_change(ev)
    return {
        "win_rate": outcomes.win_rate.value if outcomes else None,
        "win_rate_ci": outcomes.win_rate.ci if outcomes else None,
        "wins": outcomes.wins if outcomes else None,
        "ties": outcomes.ties if outcomes else None,
        "losses": outcomes.losses if outcomes else None,
        "lc_win_rate": lc.value if lc else None,
        "lc_win_rate_ci": lc.ci if lc else None,
        "n_eval_prompts": gen.n_prompts if gen else None,
        "score_change": delta.value if delta else None,
        "score_change_ci": delta.ci if delta else None,
        "mean_score_base": scores.base.value if scores else None,
        "mean_score_tuned": scores.tuned.value if scores else None,
        "implicit_reward_accuracy": pref.implicit_reward_accuracy.value,
        "implicit_reward_accuracy_ci": pref.implicit_reward_accuracy.ci,
        "n_eval_pairs": pref.n_pairs,
        "kl": kl.sequence.value if kl else None,
        "kl_per_token": kl.per_token.value if kl else None,
        "mean_length_base": gen.lengths.base.mean.value if gen else None,
        "mean_length_tuned": gen.lengths.tuned.mean.value if gen else None,
        "train_pairs": stats.get("train_pairs"),
        "eval_pairs": stats.get("eval_pairs"),
        "train_steps": train_summary.global_step,
        "report": report,
        "stage_seconds": stage_seconds,
    }


def print_summary(summary: dict, console) -> None:
    def num(v, digits=3):
        return format_interval(v, digits=digits)

    console.print(summary["verdict"], markup=False, highlight=False, soft_wrap=True)  # the outcome first
    table = Table(title=f"dpokit quickstart: {summary['model']}, DPO toward the judge's preference")
    table.add_column("metric")
    table.add_column("value", justify="right")
    ci = summary.get("win_rate_ci")
    wr = format_interval(summary["win_rate"], ci)
    if summary.get("wins") is not None:
        wr += f"  ({summary['wins']} won, {summary['ties']} tied, {summary['losses']} lost)"
    table.add_row("win rate, tuned vs base (95% CI)", wr)
    lc = summary.get("lc_win_rate_ci")
    table.add_row("length-controlled win rate (equal length)",
                  format_interval(summary.get("lc_win_rate"), lc))
    table.add_row(f"mean {summary.get('judge') or 'judge'} score, base -> tuned",
                  f"{num(summary['mean_score_base'])} -> {num(summary['mean_score_tuned'])}")
    table.add_row("implicit-reward accuracy (held-out pairs)", num(summary["implicit_reward_accuracy"]))
    table.add_row("KL(tuned || base) per answer, nats", num(summary["kl"]))
    table.add_row("mean answer length, base -> tuned (tokens)",
                  f"{num(summary['mean_length_base'], 1)} -> {num(summary['mean_length_tuned'], 1)}")
    table.add_row("pairs (train / held-out)", f"{summary['train_pairs']} / {summary['eval_pairs']}")
    table.add_row("wall time", f"{summary['wall_seconds']:.0f} s  (" + ", ".join(
        f"{k} {v:.0f} s" for k, v in summary["stage_seconds"].items()) + ")")
    table.add_row("report", summary["report"] or "(not written)")
    console.print(table)


def run_quickstart(out: str = "runs/quickstart", *, config: str | None = None, fresh: bool = False,
                   overrides: list[str] | None = None, console=None) -> dict:
    """Run every stage; returns the summary (also written to OUT/summary.json)."""
    start = time.time()
    console = console or Console()
    cfg = load_quickstart_config(config, overrides)  # all user input is checked before anything is written
    problems = check_judge(cfg.pairs.judge, cfg.pairs.judge_options, "pairs")
    if problems:
        raise UserError("; ".join(problems))
    plan_training(cfg.model_copy(update={"output": cfg.output.model_copy(
        update={"dir": str(Path(out) / "run"), "overwrite": True})}), evaluate=True)
    prompts = read_prompts(cfg.pairs.prompts)
    train_prompts, held_prompts = split_prompts(prompts, cfg.pairs)
    out_dir = Path(out)
    claim_out_dir(out_dir, "quickstart", fresh=fresh)
    seconds = {}

    t = time.time()
    stats = stage_pairs(cfg, train_prompts, held_prompts, out_dir, fresh, console)
    seconds["pairs"] = time.time() - t
    console.print(f"    {stats['train_pairs']} training / {stats['eval_pairs']} held-out pairs from "
                  f"{stats['prompts']} prompts x {cfg.pairs.num_samples} samples")

    t = time.time()
    train_summary = stage_train(cfg, out_dir, fresh, console)
    seconds["train"] = time.time() - t

    t = time.time()
    console.print("3/4 evaluating on held-out prompts and pairs")
    ev = evaluate_run(out_dir / "run", quiet=True)
    seconds["eval"] = time.time() - t

    t = time.time()
    report = stage_report(out_dir / "run")
    seconds["report"] = time.time() - t

    said, direction = run_verdict(out_dir / "run")
    summary = {"verdict": said, "outcome": direction, **summarize(ev, stats, train_summary, seconds, report)}
    summary["wall_seconds"] = time.time() - start
    summary["out"] = str(out_dir)
    summary["model"] = cfg.model.name_or_path
    summary["judge"] = cfg.eval.judge
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    print_summary(summary, console)
    console.print(f"summary: {out_dir / 'summary.json'}")
    return summary

