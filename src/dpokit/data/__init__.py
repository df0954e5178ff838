"""Preference data: read a source, normalise rows to the canonical format, check them, split them.

Entry point: `load_preferences(data_cfg) -> PreferenceData`. Token-level checks (lengths, truncation, template
hygiene) live in `templates.encode_rows`, which needs the tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dpokit.core.errors import UserError
from dpokit.core.run import DataChecks, DataReport, Malformed, ReadCounts, Split
from dpokit.data.checks import MAX_EXAMPLES, Tally, preview, row_checks, shared_prompts
from dpokit.data.formats import (
    FORMATS,
    ConvertOptions,
    Drop,
    RowError,
    apply_column_map,
    as_kind,
    detect_format,
    row_kind,
)
from dpokit.data.sources import read_rows, read_source  # noqa: F401  (read_source is public API)


@dataclass
class PreferenceData:
    train: list[dict]
    eval: list[dict]
    format: str
    report: DataReport
    # Where each row came from ("file.jsonl:12"), parallel to train / eval, for messages and report examples.
    train_locations: list[str] = field(default_factory=list)
    eval_locations: list[str] = field(default_factory=list)
    kind: str = "pair"  # feedback kind of the rows: pair, ranked or unpaired (dpokit.data.formats.row_kind)


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\x1e".join(f"{m['role']}:{m['content']}" for m in prompt)


def distinct_prompts(rows: list[dict], limit: int | None = None) -> list:
    """Distinct prompts of `rows`, in file order, at most `limit` (None = all): the held-out prompts that
    evaluation answers and that training's checkpoint selection answers."""
    seen, prompts = set(), []
    for row in rows:
        key = prompt_key(row["prompt"])
        if key not in seen:
            seen.add(key)
            prompts.append(row["prompt"])
    return prompts if limit is None else prompts[:limit]


@dataclass
class Normalised:
    rows: list[dict]
    locations: list[str]
    format: str
    counts: ReadCounts


def normalise_located(items, fmt: str, columns: dict, on_error: str, origin: str,
                      opts: ConvertOptions | None = None, bad: list | None = None) -> Normalised:
    """Canonical rows from (location, row) pairs; `bad` holds rows the reader already skipped (invalid JSON)."""
    items = list(items)
    bad = list(bad or [])
    opts = opts or ConvertOptions()
    if not items:
        raise UserError(f"{origin}: no rows{' (every line was malformed)' if bad else ''}; check the file or split")
    if fmt == "auto":
        try:
            fmt = detect_format(apply_column_map(items[0][1], columns))
        except RowError as err:
            raise UserError(f"{items[0][0]}: {err}") from None
    if fmt not in FORMATS:
        raise UserError(f"data.format: unknown format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    convert = FORMATS[fmt][1]
    out, locations = [], []
    malformed_kinds: dict[str, int] = {}
    dropped: dict[str, Tally] = {}
    identical = Tally()
    for where, row in items:
        try:
            # A row may become several (a pair split into two unpaired rows); all share its location.
            converted = as_kind(convert(apply_column_map(row, columns), opts), opts.kind, opts)
        except RowError as err:
            if on_error != "skip":
                raise UserError(f"{where}: {err}; fix the row or set data.on_error: skip") from None
            bad.append({"where": where, "kind": err.kind, "error": str(err)})
            continue
        except Drop as drop:
            dropped.setdefault(drop.reason, Tally()).add(where)
            continue
        for canonical in converted:
            if "chosen" in canonical and canonical["chosen"] == canonical["rejected"]:
                identical.add(where, chosen=canonical["chosen"])
                continue
            out.append(canonical)
            locations.append(where)
    for item in bad:
        malformed_kinds[item["kind"]] = malformed_kinds.get(item["kind"], 0) + 1
    counts = ReadCounts(
        rows_in=len(items) + sum(1 for b in bad if b["kind"] == "invalid_json"),
        malformed=Malformed(count=len(bad), by_kind=malformed_kinds,
                            examples=[{**b, "error": preview(b["error"])} for b in bad[:MAX_EXAMPLES]]),
        dropped_by_format={reason: t.as_model() for reason, t in dropped.items()},
        identical_pairs_dropped=identical.as_model(),
        rows_out=len(out),
    )
    return Normalised(out, locations, fmt, counts)


def normalise(rows, fmt: str, columns: dict, on_error: str, origin: str) -> tuple[list[dict], str, dict]:
    """Canonical rows, the format used, and counts of what was skipped and why (rows: dicts or (where, row))."""
    items = [r if isinstance(r, tuple) else (f"{origin} row {i}", r) for i, r in enumerate(rows, start=1)]
    result = normalise_located(items, fmt, columns, on_error, origin)
    return result.rows, result.format, result.counts


def split_indices_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    keys = sorted({prompt_key(r["prompt"]) for r in rows})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * fraction)) if fraction > 0 and len(keys) > 1 else 0
    held = set(keys[:n_eval])
    train = [i for i, r in enumerate(rows) if prompt_key(r["prompt"]) not in held]
    evals = [i for i, r in enumerate(rows) if prompt_key(r["prompt"]) in held]
    return train, evals


def _read_normalised(source, split, data_cfg, fmt, seed_offset=0) -> Normalised:
    bad: list | None = [] if data_cfg.on_error == "skip" else None
    items = read_rows(source, split, data_cfg.config_name, bad)
    opts = ConvertOptions(pairing=getattr(data_cfg, "pairing", "best_worst"),
                          min_score_gap=getattr(data_cfg, "min_score_gap", 0.0),
                          rng=random.Random(data_cfg.seed + seed_offset), kind=getattr(data_cfg, "kind", "auto"))
    return normalise_located(items, fmt, data_cfg.columns, data_cfg.on_error, source, opts, bad)


def load_preferences(data_cfg) -> PreferenceData:
    """Read, normalise, check and split according to a `DataConfig`."""
    source = data_cfg.source
    train_part = _read_normalised(source, data_cfg.split, data_cfg, data_cfg.format)
    fmt = train_part.format
    conversational = bool(train_part.rows) and isinstance(train_part.rows[0]["prompt"], list)
    feedback = row_kind(train_part.rows[0]) if train_part.rows else "pair"
    eval_counts = None
    if data_cfg.eval_source or data_cfg.eval_split:
        eval_src = data_cfg.eval_source or source
        eval_part = _read_normalised(eval_src, data_cfg.eval_split or "train", data_cfg, fmt, seed_offset=1)
        eval_counts = eval_part.counts
        train, train_loc = train_part.rows, train_part.locations
        evals, eval_loc = eval_part.rows, eval_part.locations
        split = Split(how="eval_source" if data_cfg.eval_source else "eval_split")
    else:
        train_idx, eval_idx = split_indices_by_prompt(train_part.rows, data_cfg.eval_fraction, data_cfg.seed)
        train = [train_part.rows[i] for i in train_idx]
        train_loc = [train_part.locations[i] for i in train_idx]
        evals = [train_part.rows[i] for i in eval_idx]
        eval_loc = [train_part.locations[i] for i in eval_idx]
        split = Split(how="by_prompt" if evals else "none", eval_fraction=data_cfg.eval_fraction, seed=data_cfg.seed)
    if data_cfg.max_rows:
        train, train_loc = train[: data_cfg.max_rows], train_loc[: data_cfg.max_rows]
    if data_cfg.max_eval_rows:
        evals, eval_loc = evals[: data_cfg.max_eval_rows], eval_loc[: data_cfg.max_eval_rows]
    if not train:
        counts = train_part.counts
        reasons = {"malformed": counts.malformed.count,
                   "with chosen == rejected": counts.identical_pairs_dropped.count,
                   **{k: v.count for k, v in counts.dropped_by_format.items()}}
        why = ", ".join(f"{v} {k}" for k, v in reasons.items() if v) or "no usable rows"
        raise UserError(f"{source}: every row was dropped ({counts.rows_in} read; {why}); check the data "
                        "format, data.columns and that chosen differs from rejected")
    report = DataReport(
        source=str(source), format=fmt, kind="conversational" if conversational else "text", feedback=feedback,
        n_train=len(train), n_eval=len(evals), train_counts=train_part.counts, eval_counts=eval_counts, split=split,
        checks=DataChecks(train=row_checks(train, train_loc), eval=row_checks(evals, eval_loc),
                          prompts_shared_train_eval=shared_prompts(train, evals, prompt_key)))
    return PreferenceData(train=train, eval=evals, format=fmt, report=report,
                          train_locations=train_loc, eval_locations=eval_loc, kind=feedback)
