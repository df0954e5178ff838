"""CLI commands of the evaluation/report stage: compare, report, sweep. Registered on the app by cli.py."""

from __future__ import annotations

from typing import Annotated

import typer

from dpokit.core.config import checked_overrides


def compare(
    run_dir: Annotated[str, typer.Argument(help="A run folder written by `dpokit train`.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt both models answer.")],
    samples: Annotated[int | None, typer.Option(help="Answers per model (default eval.samples_per_prompt).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: eval.max_new_tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Default: eval.temperature; 0 = greedy.")] = None,
    seed: Annotated[int | None, typer.Option(help="Default: eval.seed.")] = None,
    no_score: Annotated[bool, typer.Option("--no-score", help="Skip the judge scores.")] = False,
) -> None:
    """Base and tuned answers to one prompt, side by side (same seed and decoding)."""
    from dpokit.eval import load_run
    from dpokit.eval.compare import compare_prompt, print_comparison

    rows = compare_prompt(run_dir, prompt, samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed, score=not no_score)
    print_comparison(prompt, rows, load_run(run_dir).eval.judge)


def report(
    run_dir: Annotated[str, typer.Argument(help="A run folder with eval.json (run `dpokit eval` first).")],
    out: Annotated[str | None, typer.Option(help="HTML file to write (default RUN_DIR/report.html).")] = None,
    max_samples: Annotated[int, typer.Option(help="Side-by-side samples to show.")] = 20,
) -> None:
    """Write a self-contained HTML report (and report.md) for a run."""
    from dpokit.report import write_report

    path = write_report(run_dir, out, max_samples=max_samples)
    typer.echo(f"wrote {path} and {path.with_suffix('.md')}")


def sweep(
    config: Annotated[str, typer.Argument(help="Run config YAML.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", callback=checked_overrides, help="Override a key; comma-separated values sweep it: --set train.beta=0.05,0.1,0.5")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing run folders.")] = False,
) -> None:
    """Train and evaluate one run per swept value; write a reward-vs-KL frontier report (sweep.html)."""
    import json

    from dpokit.cli import _state
    from dpokit.sweep import format_sweep_table, run_sweep

    path = run_sweep(config, set_ or [], overwrite=overwrite, progress=not _state["quiet"])
    rows = json.loads((path.parent / "sweep.json").read_text(encoding="utf-8"))["runs"]
    typer.echo("\n" + format_sweep_table(rows))
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
    app.command("report")(report)
    app.command("sweep")(sweep)
