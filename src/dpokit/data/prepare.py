"""`dpokit data inspect` / `dpokit data prepare`: the same reading, checks and tokenization as training, as a
report (rich table) or as canonical JSONL files plus report.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from dpokit.core.config import DataConfig, RunConfig, _format_validation_error, parse_override
from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text, write_jsonl
from dpokit.core.models import load_tokenizer
from dpokit.core.templates import setup_chat_template
from dpokit.data import PreferenceData, load_preferences
from dpokit.data.encode import encode_rows

DEFAULT_TOKENIZER = "dpokit-tiny-llama"  # built locally, no download; pass --model for your model's token counts
OUTPUT_FILES = ("train.jsonl", "eval.jsonl", "report.json")


@dataclass
class Prepared:
    data: object  # PreferenceData
    report: dict


def prepare_data(cfg: RunConfig, tokenizer) -> tuple[PreferenceData, list[dict], list[dict]]:
    """Canonical rows, their encodings and the data report. `data.train` keeps exactly the rows that were encoded
    (pairs `data.truncation: drop` removed are gone), so `data/train.jsonl` is what was trained on."""
    data = load_preferences(cfg.data)
    setup_chat_template(tokenizer, cfg.data.chat_template)
    kept_train: list[int] = []
    kept_eval: list[int] = []
    train_enc, train_counts = encode_rows(data.train, tokenizer, cfg.data, origin=cfg.data.source,
                                          locations=data.train_locations, kept=kept_train)
    eval_enc, eval_counts = encode_rows(data.eval, tokenizer, cfg.data, origin="eval split",
                                        locations=data.eval_locations, kept=kept_eval)
    if not train_enc:
        raise UserError(
            f"{cfg.data.source}: every pair was dropped as longer than data.max_length={cfg.data.max_length}; "
            "raise max_length or set data.truncation: prompt_left"
        )
    data.train = [data.train[i] for i in kept_train]
    data.eval = [data.eval[i] for i in kept_eval]
    data.report.update(train_tokenization=train_counts, eval_tokenization=eval_counts,
                       n_train=len(data.train), n_eval=len(data.eval))
    return data, train_enc, eval_enc


def data_config(source: str, overrides: dict, sets: list[str] | None = None):
    """A validated DataConfig from the command's options and `--set key=value` (or data.key=value)."""
    raw = {"source": source, **{k: v for k, v in overrides.items() if v is not None}}
    for item in sets or []:
        parts, value = parse_override(item if item.startswith("data.") else f"data.{item}")
        if len(parts) != 2:
            raise UserError(f"--set {item!r}: expected a data key, e.g. --set truncation=drop")
        raw[parts[1]] = value
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, "data options").replace("invalid config", "invalid option")) from None


def run_checks(data_cfg, model: str | None = None) -> Prepared:
    """Read, normalise, split, tokenize and check; everything `prepare` writes and `inspect` prints."""
    data = load_preferences(data_cfg)
    tokenizer = load_tokenizer(model or DEFAULT_TOKENIZER)
    setup_chat_template(tokenizer, data_cfg.chat_template)
    kept_train: list[int] = []
    kept_eval: list[int] = []
    _, train_tok = encode_rows(data.train, tokenizer, data_cfg, data_cfg.source, data.train_locations, kept_train)
    _, eval_tok = encode_rows(data.eval, tokenizer, data_cfg, "eval", data.eval_locations, kept_eval)
    if data_cfg.truncation == "drop":  # the written files hold exactly the pairs training will use
        data.train = [data.train[i] for i in kept_train]
        data.eval = [data.eval[i] for i in kept_eval]
    report = dict(data.report, tokenizer=model or DEFAULT_TOKENIZER, n_train=len(data.train), n_eval=len(data.eval),
                  train_tokenization=train_tok, eval_tokenization=eval_tok)
    return Prepared(data, report)


def prepare(data_cfg, out_dir: str, model: str | None = None, overwrite: bool = False) -> Prepared:
    out = Path(out_dir)
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out}: already holds {', '.join(existing)}; pass --overwrite to replace them")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder")
    result = run_checks(data_cfg, model)  # everything that can fail happens before the first write
    written = ["train.jsonl", "report.json"] + (["eval.jsonl"] if result.data.eval else [])
    result.report["files"] = sorted(written)
    write_jsonl(out / "train.jsonl", result.data.train)
    if result.data.eval:
        write_jsonl(out / "eval.jsonl", result.data.eval)
    elif (out / "eval.jsonl").exists():  # --overwrite without a split: a stale eval file would mislead
        (out / "eval.jsonl").unlink()
    atomic_write_text(out / "report.json", json.dumps(result.report, indent=2, ensure_ascii=False))
    return result


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{report['source']}[/]  format: [cyan]{report['format']}[/] ({report['kind']})  "
                  f"tokenizer: {report['tokenizer']}")
    counts = report["train_counts"]
    table = Table(title="Rows", show_header=True)
    table.add_column("check")
    table.add_column("count", justify="right")
    table.add_column("examples (where)")

    def row(name, tally, note=""):
        wheres = ", ".join(Path(e["where"]).name for e in tally.get("examples", []))  # file:line, short
        table.add_row(name + (f" [dim]{note}[/]" if note else ""), str(tally["count"]), wheres)

    table.add_row("rows read", str(counts["rows_in"]), "")
    row("malformed (skipped)", counts["malformed"])
    for reason, tally in counts["dropped_by_format"].items():
        row(f"dropped: {reason}", tally)
    row("chosen == rejected (dropped)", counts["identical_pairs_dropped"])
    checks = report["checks"]["train"]
    for name, tally in checks["empty_fields"].items():
        row(f"empty {name}", tally, "(kept)")
    if "duplicate_pairs" in checks:
        row("duplicate pairs", checks["duplicate_pairs"], "(kept)")
    else:  # ranked and unpaired rows
        row("duplicate rows", checks["duplicate_rows"], "(kept)")
    if "tied_scores" in checks:
        row("rows with tied scores", checks["tied_scores"], "(kept)")
    if "repeated_responses" in checks:
        row("a response repeated in its list", checks["repeated_responses"], "(kept)")
    if "labels" in checks:
        table.add_row("desirable / undesirable rows",
                      f"{checks['labels']['desirable']} / {checks['labels']['undesirable']}", "")
    tok = report["train_tokenization"]
    over = tok["over_max_length"]
    row("over max_length", over, f"({over.get('action', 'data.truncation: ' + str(over.get('truncation')))})")
    shared = report["checks"]["prompts_shared_train_eval"]
    table.add_row("eval pairs with a train prompt", str(shared["eval_pairs"]),
                  ", ".join(e["where"] for e in shared["examples"]))
    table.add_row("pairs: train / eval", f"{report['n_train']} / {report['n_eval']}", report["split"]["how"])
    console.print(table)
    bias = tok["length_bias"]
    if "mean_tokens_by_rank" in bias:  # ranked lists
        by_rank = ", ".join(f"{rank}: {mean}" for rank, mean in bias["mean_tokens_by_rank"].items())
        longer = bias["best_longer_than_worst_fraction"]
        console.print(f"length (tokens, templated, EOS included) by rank: {by_rank or 'no lists to measure'}"
                      + (f"; best longer than worst in {longer:.0%} of lists" if longer is not None else ""))
    elif "desirable_mean_tokens" in bias:  # unpaired rows
        console.print(f"length (tokens, templated, EOS included): desirable mean {bias['desirable_mean_tokens']}, "
                      f"undesirable mean {bias['undesirable_mean_tokens']}")
    else:
        console.print(f"length (tokens, templated, EOS included): chosen mean {bias['chosen_mean_tokens']}, rejected "
                      f"mean {bias['rejected_mean_tokens']}; chosen longer in {bias['chosen_longer_fraction']:.0%} "
                      "of pairs" if bias["chosen_mean_tokens"] is not None else "no pairs to measure")
        if bias["chosen_longer_fraction"] is not None and bias["chosen_longer_fraction"] >= 0.8:
            console.print("[yellow]warning:[/] chosen is usually the longer answer; DPO may learn length, not quality")
    checks_t = tok["template_checks"]
    console.print(f"template checks on the first {checks_t['rows_checked']} pairs: no double BOS, one EOS per "
                  f"response; {checks_t['boundary_merges_handled']} prompt/response boundaries merge tokens "
                  "(handled: parts are tokenized apart)")
