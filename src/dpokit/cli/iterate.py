"""CLI command of the iterative pipeline: `dpokit iterate`. Registered on the app by cli/__init__.py."""

from __future__ import annotations

from typing import Annotated

import typer

from dpokit.core.config import checked_overrides


def iterate(
    config: Annotated[str | None, typer.Option(help="Iterate config; default: the bundled configs/iterate.yaml.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds (iterate.rounds).")] = None,
    out: Annotated[str, typer.Option(help="Output folder: pairs, one run folder per round, iterate.json, "
                                          "iterate.html.")] = "runs/iterate",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", callback=checked_overrides, help="Override a config key: --set section.key=value (repeatable).")] = None,
    compare_offline: Annotated[bool, typer.Option(
        "--compare-offline", help="Also train the budget-matched offline arm (iterate.compare_offline).")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over: remove OUT (written by dpokit iterate) "
                                                        "first.")] = False,
) -> None:
    """Iterative on-policy DPO: rounds of sample (current policy) -> judge -> train (one LoRA adapter continued)
    -> evaluate against pi0 and the previous round. An interrupted run continues where it stopped."""
    from rich.console import Console

    from dpokit.cli import _state
    from dpokit.core.errors import UserError
    from dpokit.iterate import format_table, run_iterate

    overrides = list(set_ or [])
    if rounds is not None:
        if rounds < 1:
            raise UserError(f"--rounds: {rounds}; give 1 or more rounds")
        overrides.append(f"iterate.rounds={rounds}")
    if compare_offline:
        overrides.append("iterate.compare_offline=true")
    quiet = _state["quiet"]
    summary = run_iterate(out, config=config, overrides=overrides, fresh=fresh, progress=not quiet,
                          console=Console(quiet=quiet))
    typer.echo("\n" + format_table(summary))
    typer.echo(f"wrote {out}/iterate.json and {summary['report']}")


def register(app: typer.Typer) -> None:
    app.command("iterate")(iterate)
