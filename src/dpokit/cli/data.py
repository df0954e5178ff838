"""`dpokit data inspect | prepare | formats`, registered on the CLI's `data` sub-app by `register(data_app)`."""

from __future__ import annotations

import contextlib
import re
from typing import Annotated

import typer

from dpokit.core.config import checked_overrides

Source = Annotated[str, typer.Argument(help="Local .jsonl/.json/.csv/.parquet file or folder, or a hub dataset id.")]
Format = Annotated[str, typer.Option("--format", help="Row shape (see `dpokit data formats`); auto detects it.")]
Columns = Annotated[str | None, typer.Option(
    "--columns", help="Column map canonical=yours, e.g. prompt=question,chosen=response_j,rejected=response_k")]
Model = Annotated[str | None, typer.Option(
    "--model", help="Tokenizer for the token checks (hub id, folder or alias); default dpokit-tiny-llama.")]
Split = Annotated[str, typer.Option("--split", help="Split of a hub dataset.")]
ConfigName = Annotated[str | None, typer.Option("--config-name", help="Hub dataset configuration name.")]
ChatTemplate = Annotated[str | None, typer.Option(
    "--chat-template", help="For conversational data: chatml, plain or a Jinja string (needed when the tokenizer "
    "has none).")]
MaxLength = Annotated[int | None, typer.Option("--max-length", help="Max tokens of prompt + response.")]
Truncation = Annotated[str | None, typer.Option("--truncation", help="prompt_left, drop or error.")]
OnError = Annotated[str | None, typer.Option("--on-error", help="Malformed rows: raise (default) or skip.")]
EvalFraction = Annotated[float, typer.Option("--eval-fraction", help="Hold out this fraction of prompts.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for the split (and best_random pairing).")]
Sets = Annotated[list[str] | None, typer.Option(
    "--set", callback=checked_overrides, help="Any other data key: --set pairing=best_random (repeatable).")]


def _cfg(source, fmt, columns, split, config_name, chat_template, max_length, truncation, on_error,
         eval_fraction, seed, sets):
    from dpokit.data.formats import parse_columns
    from dpokit.data.prepare import data_config

    return data_config(source, {
        "format": fmt, "columns": parse_columns(columns), "split": split, "config_name": config_name,
        "chat_template": chat_template, "max_length": max_length, "truncation": truncation,
        "on_error": on_error, "eval_fraction": eval_fraction, "seed": seed,
    }, sets)


# Messages from the data stage name config keys (data.chat_template); these commands take flags instead.
FLAG_FOR_KEY = {f"data.{key}": f"--{key.replace('_', '-')}" for key in (
    "chat_template", "max_length", "truncation", "on_error", "eval_fraction", "columns", "format", "split",
    "config_name", "seed")}


@contextlib.contextmanager
def keys_as_flags():
    """Re-word a UserError's config keys as this command's flags (`data.chat_template` -> `--chat-template`)."""
    from dpokit.core.errors import UserError

    try:
        yield
    except UserError as err:
        text = str(err)
        for key, flag in FLAG_FOR_KEY.items():
            text = re.sub(rf"\b{re.escape(key)}\b", flag, text)
        reworded = UserError(text)
        reworded.exit_code = err.exit_code
        raise reworded from None


def register(data_app: typer.Typer) -> None:
    @data_app.command("inspect")
    def inspect(source: Source, fmt: Format = "auto", columns: Columns = None, model: Model = None,
                split: Split = "train", config_name: ConfigName = None, chat_template: ChatTemplate = None,
                max_length: MaxLength = None, truncation: Truncation = None, on_error: OnError = None,
                eval_fraction: EvalFraction = 0.0, seed: Seed = 42, set_: Sets = None,
                json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False) -> None:
        """Read, normalise and check preference data; print the report (nothing is written)."""

        import json

        from dpokit.data.prepare import print_report, run_checks
        from dpokit.data.vision import is_vision_source, load_vision_preferences, vision_report

        if is_vision_source(source):  # images: checked against the model's processor, images never truncated
            with keys_as_flags():
                data = load_vision_preferences(model or "dpokit-tiny-llama", source=source,
                                               max_length=max_length or 1024)
            typer.echo(json.dumps(vision_report(data), indent=2 if json_out else None))
            return
        with keys_as_flags():
            cfg = _cfg(source, fmt, columns, split, config_name, chat_template, max_length, truncation, on_error,
                       eval_fraction, seed, set_)
            report = run_checks(cfg, model).report
        if json_out:
            typer.echo(report.model_dump_json(indent=2))
        else:
            print_report(report)

    @data_app.command("prepare")
    def prepare(source: Source,
                out: Annotated[str, typer.Option("--out", help="Folder for train.jsonl, eval.jsonl, report.json.")],
                fmt: Format = "auto", columns: Columns = None, model: Model = None, split: Split = "train",
                config_name: ConfigName = None, chat_template: ChatTemplate = None, max_length: MaxLength = None,
                truncation: Truncation = None, on_error: OnError = None, eval_fraction: EvalFraction = 0.0,
                seed: Seed = 42, set_: Sets = None,
                overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files in --out.")] = False,
                ) -> None:
        """Write canonical pairs (DIR/train.jsonl, DIR/eval.jsonl when splitting) and DIR/report.json."""
        from dpokit.data.prepare import prepare as run_prepare

        with keys_as_flags():
            cfg = _cfg(source, fmt, columns, split, config_name, chat_template, max_length, truncation, on_error,
                       eval_fraction, seed, set_)
            result = run_prepare(cfg, out, model, overwrite)
        r = result.report
        typer.echo(f"{r.format} ({r.kind}): {r.n_train} train / {r.n_eval} eval pairs -> {out} "
                   f"({', '.join(r.files or [])})")

    @data_app.command("formats")
    def formats() -> None:
        """List the row shapes dpokit reads (data.format)."""
        from dpokit.data.formats import FORMAT_HELP

        for name, text in FORMAT_HELP.items():
            typer.echo(f"{name:26s} {text}")
