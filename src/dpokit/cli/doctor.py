"""`dpokit doctor RUN_DIR [--json]`: what a run's curves and evaluation mean (dpokit.eval.doctor)."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def doctor(
    run_dir: Annotated[str, typer.Argument(help="A run folder written by `dpokit train`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print {\"verdict\", \"findings\": [...]} as JSON.")] = False,
) -> None:
    """Explain a run's curves: rules over metrics.jsonl, eval.json and the eval samples (docs/doctor.md)."""
    # Lazy: dpokit.eval imports torch, and `dpokit --help` must not.
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from dpokit.core.run import RunDir
    from dpokit.eval.doctor import diagnose, verdict
    from dpokit.eval.outcome import judge_outcome

    findings = diagnose(run_dir)
    result = RunDir(run_dir).read_eval()
    said = verdict(findings, result)  # leads with the outcome: better / no measurable change / worse
    if as_json:
        typer.echo(json.dumps({"run_dir": str(run_dir), "verdict": said, "outcome": judge_outcome(result).direction,
                               "findings": [f.model_dump(mode="json") for f in findings]}, indent=2))
        return
    console = Console()
    console.print(said, markup=False, highlight=False, soft_wrap=True)
    if not findings:
        return
    table = Table(show_lines=True)
    table.add_column("finding", no_wrap=True)
    table.add_column("evidence and meaning")
    table.add_column("what to try")
    for f in findings:
        # Text, not markup: evidence holds "[low, high]" intervals and user text.
        table.add_row(Text(f"{f.id}\n({f.severity})"), Text(f"{f.evidence}\n\n{f.meaning}"),
                      Text("\n".join(f"- {t}" for t in f.what_to_try)))
    console.print(table)
    console.print("Sources and thresholds: docs/doctor.md", markup=False)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
