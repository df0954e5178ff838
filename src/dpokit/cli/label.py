"""`dpokit label serve | export`: people pick the better of two answers in the browser; the picks become pairs.

Registered on the app by `register(app)`. The server's stack (starlette, uvicorn) is the optional extra
`dpokit[label]`, imported only inside `serve`.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from typing import Annotated

import typer

from dpokit.core.errors import UserError

label_app = typer.Typer(no_args_is_help=True, help="Label preferences in the browser; export them as pairs.")
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def _is_loopback(host: str) -> bool:
    try:
        return host in LOCAL_HOSTS or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@label_app.command("serve")
def serve(
    source: Annotated[str, typer.Argument(help="JSONL of prompts with two or more answers each: `dpokit data "
                                               "generate --keep-all` output, eval_samples.jsonl, or "
                                               '{"prompt": ..., "responses": [...]} lines.')],
    db: Annotated[str, typer.Option("--db", help="SQLite file of the answers; created on first use, resumed after.")],
    host: Annotated[str, typer.Option(help="Address to listen on; anything but 127.0.0.1 needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    overlap: Annotated[int, typer.Option("--overlap", help="People who label each item (majority vote on export).")] = 1,
    token: Annotated[str | None, typer.Option(
        "--token", help="Shared secret the page sends with each request; generated and printed when the host is "
        "not 127.0.0.1 and none is given.")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Seed of the left/right order; recorded in a new DB (default 0).")] = None,
) -> None:
    """Serve the labelling page: prompt and two answers side by side; keys 1 / 2 / t / s / u."""
    try:  # the optional extra; imported here so that `dpokit --help` stays light
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError('dpokit label serve needs starlette and uvicorn: pip install "dpokit[label]"') from None
    from dpokit.label.store import open_store

    local = _is_loopback(host)
    if not local and not token:
        token = secrets.token_urlsafe(18)
    store = open_store(db, source, overlap=overlap, seed=seed)  # every check before the port is bound
    progress = store.progress("")
    from dpokit.label.server import build_app

    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}/" + (f"?token={token}" if token else "")
    typer.echo(f"labelling {progress['items']} items of {source} into {db} (overlap {overlap}): open {url}")
    typer.echo("each person adds ?annotator=NAME (or gives a name on the page); Ctrl-C stops, answers are saved")
    try:
        # access_log off: the token may be in a URL, and the answers are in the DB anyway.
        uvicorn.run(build_app(store, token=token, local_only=local), host=host, port=port, log_level="warning",
                    access_log=False)
    finally:
        store.close()


@label_app.command("export")
def export(
    db: Annotated[str, typer.Argument(help="Label DB written by `dpokit label serve`.")],
    out: Annotated[str, typer.Option("--out", help="Output .jsonl of canonical pairs (chosen = preferred).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Write the answers as preference pairs (majority vote, shuffle undone) and print agreement statistics."""
    from dpokit.label.export import export_labels

    summary = export_labels(db, out, overwrite=overwrite)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
        return
    agree, left = summary["agreement"], summary["left_chosen"]
    typer.echo(f"wrote {summary['pairs']} pairs to {out} from {summary['labelled_items']} labelled items of "
               f"{summary['items']} ({summary['tied_items']} tied, not written; {summary['choices']['skip']} skips, "
               f"{summary['choices']['tie']} tie answers)")
    typer.echo("annotators: " + (", ".join(f"{k} ({v})" for k, v in summary["annotators"].items()) or "none"))
    if agree["items"]:
        kappa = "undefined" if agree["kappa"] is None else f"{agree['kappa']:.3f}"
        typer.echo(f"agreement on {agree['items']} items with 2+ answers: {agree['percent']:.1%}, "
                   f"{agree['kappa_kind']} kappa {kappa} ({agree['kappa_items']} items)")
    else:
        typer.echo("agreement: no item has two answers yet (--overlap 2 or more gives some)")
    if left["n"]:
        typer.echo(f"left answer chosen {left['value']:.1%} of {left['n']} decided answers "
                   f"(95% CI {left['ci'][0]:.1%}-{left['ci'][1]:.1%}; 50% = no position bias)")


def register(app: typer.Typer) -> None:
    app.add_typer(label_app, name="label")
