"""The `dpokit` command. Commands stay thin: parse options, call one entry function, print.

User errors (`UserError`) print one line on stderr and exit 2; `--debug` shows the traceback instead.

The CLI keeps its heavy imports (the pipeline stages, hence torch, transformers, datasets) lazy, inside the command
functions, for startup time: `dpokit --help` and `dpokit --version` load none of them (tests/test_layers.py checks).
This is the one place where such function-level imports are the rule; at module level import only light modules.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from dpokit.core.config import ModelConfig, PairsConfig, checked_overrides
from dpokit.core.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Direct Preference Optimization on the Hugging Face stack: data -> train -> eval -> report.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, convert and generate preference data.")
app.add_typer(data_app, name="data")

from dpokit.cli.data import register as _register_data_commands  # noqa: E402

_register_data_commands(data_app)

_state = {"debug": False, "quiet": False}

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", callback=checked_overrides, help="Override a config key: --set section.key=value (repeatable).")]


def _version(value: bool) -> None:
    if value:
        from dpokit import __version__

        typer.echo(f"dpokit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only results and errors (for scripts).")] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show third-party progress bars and deprecation warnings too.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Global flags (--debug, --quiet, --verbose) may also follow the command: `dpokit train CONFIG --quiet`."""
    _state["debug"] = debug or os.environ.get("DPOKIT_DEBUG") == "1"
    _state["quiet"] = quiet and not verbose
    if not verbose:
        quiet_third_party()


def quiet_third_party() -> None:
    """Hide the Hugging Face libraries' progress bars ("Loading weights", "Writing model shards", downloads) and
    deprecation warnings addressed to library authors, not to dpokit's users. `--verbose` keeps them. A variable the
    user set wins."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow huggingface_hub's switch
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


GLOBAL_FLAGS = ("--debug", "--quiet", "-q", "--verbose", "-v")


def hoist_global_flags(argv: list[str]) -> list[str]:
    """Move global flags given after the command to the front, where click expects them (`--` ends the search).

    Workaround: click parses a group's options only before the subcommand's name, so `dpokit train x.yaml --debug`
    would be "no such option"; declaring the five flags on every command instead would repeat them ~25 times.
    Remove if click (or typer) gains options that apply after the subcommand."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    return flags + [a for i, a in enumerate(argv) if i >= end or a not in GLOBAL_FLAGS]


def _load(config: str, overrides: list[str] | None, overwrite: bool = False, check_files: bool = True):
    from dpokit.core.config import load_config

    extra = list(overrides or [])
    if overwrite:
        extra.append("output.overwrite=true")
    return load_config(config, extra, check_files=check_files)


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="Run config YAML, e.g. configs/tiny.yaml")],
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the evaluation at the end.")] = False,
) -> None:
    """Train with DPO as the config says; writes the run folder (output.dir), then evaluates it (eval.enabled)."""
    from dpokit.core.processes import is_main_process
    from dpokit.train.plan import plan_training

    cfg = _load(config, set_, overwrite, check_files=False)  # the plan checks the paths with everything else
    # Every static check, the evaluation's judge included, runs before any weights load, and before the trainer's
    # and the evaluation's imports (transformers' Trainer, peft, bitsandbytes: seconds), so a mistake is told at once.
    plan = plan_training(cfg, resume=resume, evaluate=False if no_eval else None, origin=config)
    from dpokit.eval import evaluate_run
    from dpokit.train.trainer import run_training

    quiet = _state["quiet"]
    result = run_training(plan, progress=not quiet)
    if not is_main_process():  # one summary per job, not per rank
        return
    if not result.evaluate:
        typer.echo(f"trained in {result.wall_seconds:.1f} s; run folder: {result.run_dir}")
        if not quiet:
            typer.echo(f"next: dpokit eval {result.run_dir}")
        return
    from dpokit.report import write_report

    evaluate_run(result.run_dir, quiet=quiet)
    report = write_report(result.run_dir)
    typer.echo(f"trained in {result.wall_seconds:.1f} s; run folder: {result.run_dir}")
    typer.echo(f"report: {report}")


@app.command("eval")
def eval_(
    run_dir: Annotated[str, typer.Argument(help="A run folder written by `dpokit train`.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", callback=checked_overrides, help="Override an eval setting for this evaluation: --set eval.KEY=VALUE (repeatable), e.g. "
        "--set eval.judge=python --set eval.num_prompts=32. The settings used are recorded in eval.json.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per forward pass (eval.batch_size).")] = None,
    export: Annotated[tuple[str, str] | None, typer.Option(
        "--export", metavar="FORMAT FILE", help="Instead of evaluating, write the tuned model's answers for an "
        "external leaderboard tool: alpaca_eval (model_outputs.json) or arena_hard (answer JSONL).")] = None,
    prompts: Annotated[str | None, typer.Option(
        help="With --export: the prompts to answer (.txt, .jsonl with 'prompt', AlpacaEval's 'instruction' rows, "
        "Arena-Hard's question.jsonl); default: the run's held-out prompts.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="With --export: replace FILE if it exists.")] = False,
) -> None:
    """Evaluate a trained run on its held-out pairs; writes RUN_DIR/eval.json. With --export FORMAT FILE, write the
    tuned model's answers for alpaca_eval or arena_hard instead."""
    if export is not None:
        from dpokit.eval.answers import export_answers

        if set_ or batch_size is not None:
            raise UserError("--export writes answers only; drop --set and --batch-size (they change an evaluation)")
        typer.echo(f"wrote {export_answers(run_dir, export[0], export[1], prompts=prompts, overwrite=overwrite)}")
        return
    if prompts is not None or overwrite:
        raise UserError("--prompts and --overwrite go with --export FORMAT FILE; add it, or drop them")
    from dpokit.core.run import RunDir

    RunDir(run_dir).require_model()   # a wrong folder is told before the evaluation's imports (seconds)
    from dpokit.eval import evaluate_run

    overrides = list(set_ or [])
    if batch_size is not None:
        overrides.append(f"eval.batch_size={batch_size}")
    evaluate_run(run_dir, overrides=overrides, quiet=_state["quiet"])
    typer.echo(f"wrote {os.path.join(run_dir, 'eval.json')}")


def _pairs_option(key: str):
    """A `dpokit data generate` flag for `pairs.KEY`: its help is the key's own description (one text, in
    core/config.py) and the default shown is the key's default; the flag itself defaults to None (= not given)."""
    field = PairsConfig.model_fields[key]
    return typer.Option(help=field.description or "",
                        show_default=f"pairs.{key} = {field.get_default(call_default_factory=True)}")


@data_app.command("generate")
def data_generate(
    model: Annotated[str | None, typer.Option(
        help="Model: hub id, folder or alias; default: model.name_or_path of --config, else "
        f"{ModelConfig.model_fields['name_or_path'].default}.")] = None,
    prompts: Annotated[str | None, _pairs_option("prompts")] = None,
    num_samples: Annotated[int | None, _pairs_option("num_samples")] = None,
    max_new_tokens: Annotated[int | None, _pairs_option("max_new_tokens")] = None,
    temperature: Annotated[float | None, _pairs_option("temperature")] = None,
    top_p: Annotated[float | None, _pairs_option("top_p")] = None,
    judge: Annotated[str | None, _pairs_option("judge")] = None,
    min_gap: Annotated[float | None, _pairs_option("min_gap")] = None,
    seed: Annotated[int | None, _pairs_option("seed")] = None,
    batch_size: Annotated[int | None, _pairs_option("batch_size")] = None,
    dtype: Annotated[str | None, _pairs_option("dtype")] = None,
    out: Annotated[str, typer.Option(help="Output .jsonl of canonical pairs.")] = "pairs.jsonl",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    keep_all: Annotated[bool, typer.Option(
        "--keep-all", help='Write every answer with its score, one {"prompt", "responses", "scores"} row per prompt '
        "(for `dpokit label serve`, or data.kind: ranked), instead of best-vs-worst pairs.")] = False,
    config: Annotated[str | None, typer.Option(
        "--config", help="Run config YAML (e.g. configs/quickstart.yaml) whose pairs section, model.name_or_path and "
        "data.system_prompt to use; flags and --set override it.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", callback=checked_overrides, help="Override a pairs key: --set pairs.KEY=VALUE (repeatable), e.g. --set pairs.num_samples=8 "
        "--set pairs.judge_options.model=./my-rm. Keys: `dpokit config-keys` (pairs section).")] = None,
) -> None:
    """Sample answers per prompt, score them with a judge, write best-vs-worst preference pairs (JSONL).

    Settings are the run config's `pairs` section: defaults, then --config's pairs, then the flags, then --set.
    pairs.eval_prompts (quickstart's held-out split) does not apply: every pair goes to --out."""
    from dpokit.core.config import apply_overrides, parse_override, read_config_file, section_from_dict
    from dpokit.data.generate import generate_pairs_to_file

    raw_pairs: dict = {}
    model_name = system_prompt = None
    if config:
        raw = read_config_file(config)
        raw_pairs = dict(raw.get("pairs") or {})
        model_name = (raw.get("model") or {}).get("name_or_path")
        system_prompt = (raw.get("data") or {}).get("system_prompt")
        for key, value in (("model.name_or_path", model_name), ("data.system_prompt", system_prompt)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"{config}: {key}: expected a string, got {type(value).__name__}")
    flags = {"prompts": prompts, "num_samples": num_samples, "max_new_tokens": max_new_tokens,
             "temperature": temperature, "top_p": top_p, "judge": judge, "min_gap": min_gap, "seed": seed,
             "batch_size": batch_size, "dtype": dtype}
    labels = {}
    for key, value in flags.items():
        if value is not None:
            raw_pairs[key] = value
            labels[f"pairs.{key}"] = "--" + key.replace("_", "-")
    for item in set_ or []:
        parts, _ = parse_override(item)
        if parts[0] != "pairs":
            raise UserError(f"--set {item!r}: dpokit data generate takes only pairs keys (--set pairs.KEY=VALUE, e.g. "
                            f"--set pairs.num_samples=8); {'.'.join(parts)} is not one")
        if parts[1] == "eval_prompts":
            raise UserError(f"--set {item!r}: pairs.eval_prompts is dpokit quickstart's held-out split; dpokit data "
                            "generate writes every pair to --out (hold pairs out when training: data.eval_fraction)")
        labels[".".join(parts[:2])] = "--set"
    raw_pairs = apply_overrides({"pairs": raw_pairs}, list(set_ or []))["pairs"]
    origin = "dpokit data generate" + (f" --config {config}" if config else "")
    pairs_cfg = section_from_dict("pairs", raw_pairs, origin, labels)
    model_name = model or model_name or ModelConfig.model_fields["name_or_path"].default
    stats = generate_pairs_to_file(model_name, out, pairs_cfg, system_prompt=system_prompt, overwrite=overwrite,
                                   keep_all=keep_all)
    if keep_all:
        typer.echo(f"wrote {stats['samples']} answers with scores for {stats['prompts']} prompts to {out} "
                   f"(sampled in {stats['dtype']})")
        return
    typer.echo(f"wrote {stats['pairs']} pairs from {stats['prompts']} prompts to {out} "
               f"({stats['dropped_ties_or_small_gap']} dropped: ties or gap < {pairs_cfg.min_gap}; "
               f"sampled in {stats['dtype']})")


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


from dpokit.cli.reports import register as _register_eval_commands  # noqa: E402

_register_eval_commands(app)  # compare, report, sweep

from dpokit.cli.doctor import register as _register_doctor  # noqa: E402

_register_doctor(app)  # doctor

from dpokit.cli.plan import register as _register_plan  # noqa: E402

_register_plan(app)  # plan

from dpokit.cli.label import register as _register_label  # noqa: E402

_register_label(app)  # label serve, label export

from dpokit.cli.iterate import register as _register_iterate  # noqa: E402

_register_iterate(app)  # iterate


@app.command("losses")
def losses_() -> None:
    """The losses for train.loss, from the loss registry: data kind, formula, paper, reference, TRL."""
    from rich.console import Console
    from rich.table import Table

    from dpokit.train.losses import loss_table

    table = Table(title="train.loss (combine with weights: sigmoid:1.0,sft:0.5)", show_lines=True)
    for column in ("loss", "data", "formula", "paper", "needs reference", "also in TRL"):
        table.add_column(column, overflow="fold")
    for row in loss_table():
        table.add_row(row["loss"], row["data"], row["formula"], row["paper"], row["reference"], row["trl"])
    Console(width=max(Console().width, 140)).print(table)


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
    from dpokit.core.config import RunConfig

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
    """The ClickException classes a usage error may be raised as, whichever typer is installed.

    Workaround for typer's vendoring: typer >= 0.20 ships its own copy of click as `typer._click` and raises those
    exceptions (not subclasses of click's), while older typer raises click's own `click.exceptions`. Probe both.
    Remove once dpokit requires typer >= 0.20 only: then catch `typer._click.exceptions.ClickException` directly.
    """
    import importlib

    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            yield importlib.import_module(module).ClickException
        except ImportError:
            pass


def main() -> None:
    """The `dpokit` command. A rank started by a launcher leaves through `leave_launched_rank` (no interpreter
    shutdown, where gloo's threads can abort a finished run)."""
    from dpokit.core.processes import leave_launched_rank

    try:
        _main()
    except SystemExit as done:
        leave_launched_rank(done.code)
        raise
    leave_launched_rank(0)


def _main() -> None:
    try:
        app(args=hoist_global_flags(sys.argv[1:]), prog_name="dpokit", standalone_mode=False)
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
        click_errors = tuple(_click_exception_types())
        if isinstance(err, click_errors):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
