"""The `dpokit` command. Commands stay thin: parse options, call one entry function, print.

User errors (`UserError`) print one line on stderr and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from dpokit.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Direct Preference Optimization on the Hugging Face stack: data -> train -> eval -> report.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, convert and generate preference data.")
app.add_typer(data_app, name="data")

from dpokit.data.commands import register as _register_data_commands  # noqa: E402

_register_data_commands(data_app)

_state = {"debug": False}

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key: --set section.key=value (repeatable).")]


def _version(value: bool) -> None:
    if value:
        from dpokit import __version__

        typer.echo(f"dpokit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("DPOKIT_DEBUG") == "1"


def _load(config: str, overrides: list[str] | None, overwrite: bool = False):
    from dpokit.config import load_config

    extra = list(overrides or [])
    if overwrite:
        extra.append("output.overwrite=true")
    return load_config(config, extra)


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="Run config YAML, e.g. configs/tiny.yaml")],
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the evaluation at the end.")] = False,
) -> None:
    """Train with DPO as the config says; writes the run folder (output.dir)."""
    from dpokit.train.trainer import run_training

    cfg = _load(config, set_, overwrite)
    result = run_training(cfg, resume=resume, evaluate=False if no_eval else None)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per job, not per rank
        typer.echo(f"run folder: {result.run_dir}  ({result.wall_seconds:.1f} s)")


@app.command("eval")
def eval_(
    run_dir: Annotated[str, typer.Argument(help="A run folder written by `dpokit train`.")],
    batch_size: Annotated[int | None, typer.Option(help="Pairs per forward pass.")] = None,
) -> None:
    """Evaluate a trained run on its held-out pairs; writes RUN_DIR/eval.json."""
    from dpokit.eval import evaluate_run

    evaluate_run(run_dir, batch_size=batch_size)
    typer.echo(f"wrote {os.path.join(run_dir, 'eval.json')}")


@data_app.command("generate")
def data_generate(
    model: Annotated[str, typer.Option(help="Model: hub id, folder or alias.")] = "smollm2-135m-instruct",
    prompts: Annotated[str | None, typer.Option(help="Prompts: .txt (one a line) or .jsonl ('prompt' field); "
                                                     "default: the bundled quickstart prompts.")] = None,
    num_samples: Annotated[int, typer.Option(help="Answers sampled per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Max tokens per answer.")] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 1.0,
    judge: Annotated[str, typer.Option(help="Judge scoring each answer (higher = preferred).")] = "sentiment",
    min_gap: Annotated[float, typer.Option(help="Keep a pair only if best - worst score >= this.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per generate() call.")] = 32,
    dtype: Annotated[str, typer.Option(help="Sampling precision: auto (bfloat16 where the GPU or CPU runs it "
                                            "natively, else float32), float32, bfloat16, float16.")] = "auto",
    out: Annotated[str, typer.Option(help="Output .jsonl of canonical pairs.")] = "pairs.jsonl",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
) -> None:
    """Sample answers per prompt, score them with a judge, write best-vs-worst preference pairs (JSONL)."""
    import typing

    from dpokit.config import PairsConfig
    from dpokit.data.generate import PairSettings, generate_pairs_to_file
    from dpokit.models import pick_sampling_dtype

    choices = typing.get_args(PairsConfig.model_fields["dtype"].annotation)  # the config key's own choices
    if dtype not in choices:
        raise UserError(f"--dtype: {dtype!r}; use one of {', '.join(choices)}")
    settings = PairSettings(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, batch_size=batch_size, judge=judge, min_gap=min_gap,
                            dtype=pick_sampling_dtype(dtype))
    stats = generate_pairs_to_file(model, prompts, out, settings, overwrite=overwrite)
    typer.echo(f"wrote {stats['pairs']} pairs from {stats['prompts']} prompts to {out} "
               f"({stats['dropped_ties_or_small_gap']} dropped: ties or gap < {min_gap}; sampled in {stats['dtype']})")


@app.command()
def quickstart(
    out: Annotated[str, typer.Option(help="Output folder (pairs, run, report, summary.json).")] = "runs/quickstart",
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore cached pairs and training; redo everything.")] = False,
    config: Annotated[str | None, typer.Option(help="Quickstart config; default: the bundled "
                                                    "configs/quickstart.yaml.")] = None,
    set_: SetOption = None,
) -> None:
    """Generate sentiment pairs, train DPO with LoRA, evaluate and report, on SmolLM2-135M (offline, CPU)."""
    from dpokit.quickstart import run_quickstart

    run_quickstart(out, config=config, fresh=fresh, overrides=set_)


from dpokit.eval.commands import register as _register_eval_commands  # noqa: E402

_register_eval_commands(app)  # compare, report, sweep


@app.command("losses")
def losses_() -> None:
    """List the DPO losses for train.loss (from the loss registry), with their paper and whether they need a reference."""
    from dpokit.train.losses import LOSSES

    for name, (fn, needs_ref) in LOSSES.items():
        first = (fn.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:10s} {'reference' if needs_ref else 'no reference':13s} {first}")


@app.command("export")
def export(
    run_dir: Annotated[str, typer.Argument(help="A run folder written by `dpokit train`.")],
    out: Annotated[str, typer.Option("--out", help="Folder to write the HF model to.")],
    merge: Annotated[bool, typer.Option("--merge", help="Merge a LoRA adapter into the base weights.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", help="Also upload to this hub repo (user/name); token from HF_TOKEN.")] = None,
) -> None:
    """Export a trained run as a standalone Hugging Face model folder with a model card."""
    from dpokit.export import export_run

    path = export_run(run_dir, out, merge=merge, overwrite=overwrite, push_to_hub=push_to_hub)
    typer.echo(f"exported {path}" + (f" and pushed to {push_to_hub}" if push_to_hub else ""))


@app.command("config-keys")
def config_keys() -> None:
    """Print every config key with its default and help."""
    from dpokit.config import RunConfig

    typer.echo(describe_config(RunConfig))


def describe_config(model, prefix: str = "") -> str:
    from pydantic import BaseModel

    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = next((c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is not None:
            lines.append(f"{prefix}{name}:  {field.description or ''}".rstrip())
            lines.append(describe_config(sub, prefix + "  "))
        else:
            default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"{prefix}{name} = {default}  # {field.description or ''}")
    return "\n".join(lines)


def _click_exception_types():
    import importlib

    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            yield importlib.import_module(module).ClickException
        except ImportError:
            pass


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors carry their own exit code
        # typer >= 0.20 vendors click as typer._click; older typer raises click's own exceptions.
        click_errors = tuple(_click_exception_types())
        if isinstance(err, click_errors):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
