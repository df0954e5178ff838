"""Preference data: read a source, normalise rows to the canonical format, check them, split them.

Entry point: `load_preferences(data_cfg) -> PreferenceData`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dpokit.data.formats import FORMATS, RowError, apply_column_map, detect_format
from dpokit.data.sources import read_source
from dpokit.errors import UserError


@dataclass
class PreferenceData:
    train: list[dict]
    eval: list[dict]
    format: str
    report: dict = field(default_factory=dict)


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\x1e".join(f"{m['role']}:{m['content']}" for m in prompt)


def normalise(rows, fmt: str, columns: dict, on_error: str, origin: str) -> tuple[list[dict], str, dict]:
    """Canonical rows, the format used, and counts of what was skipped and why."""
    rows = list(rows)
    if not rows:
        raise UserError(f"{origin}: no rows; check the file or split")
    first = apply_column_map(rows[0], columns) if columns else rows[0]
    if fmt == "auto":
        try:
            fmt = detect_format(set(first))
        except RowError as err:
            raise UserError(f"{origin}: {err}") from None
    if fmt not in FORMATS:
        raise UserError(f"data.format: unknown format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    convert = FORMATS[fmt][1]
    out, counts = [], {"rows_in": len(rows), "malformed": 0, "dropped_by_format": 0, "identical_pairs": 0}
    for index, row in enumerate(rows):
        try:
            canonical = convert(apply_column_map(row, columns))
        except RowError as err:
            if on_error == "skip":
                counts["malformed"] += 1
                continue
            raise UserError(f"{origin}: row {index + 1}: {err}; fix the row or set data.on_error: skip") from None
        if canonical is None:
            counts["dropped_by_format"] += 1
            continue
        if canonical["chosen"] == canonical["rejected"]:
            counts["identical_pairs"] += 1
            continue
        out.append(canonical)
    counts["rows_out"] = len(out)
    return out, fmt, counts


def split_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts, so the same prompt never lands in both train and eval."""
    keys = sorted({prompt_key(r["prompt"]) for r in rows})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, round(len(keys) * fraction)) if fraction > 0 and len(keys) > 1 else 0
    held = set(keys[:n_eval])
    train = [r for r in rows if prompt_key(r["prompt"]) not in held]
    evals = [r for r in rows if prompt_key(r["prompt"]) in held]
    return train, evals


def load_preferences(data_cfg) -> PreferenceData:
    """Read, normalise and split according to a `DataConfig`."""
    source = data_cfg.source
    rows = read_source(source, data_cfg.split, data_cfg.config_name)
    train, fmt, counts = normalise(rows, data_cfg.format, data_cfg.columns, data_cfg.on_error, source)
    report = {"source": source, "format": fmt, "train_counts": counts}
    if data_cfg.eval_source or data_cfg.eval_split:
        eval_src = data_cfg.eval_source or source
        eval_rows = read_source(eval_src, data_cfg.eval_split or "train", data_cfg.config_name)
        evals, _, eval_counts = normalise(eval_rows, fmt, data_cfg.columns, data_cfg.on_error, eval_src)
        report["eval_counts"] = eval_counts
    else:
        train, evals = split_by_prompt(train, data_cfg.eval_fraction, data_cfg.seed)
    if data_cfg.max_rows:
        train = train[: data_cfg.max_rows]
    if data_cfg.max_eval_rows:
        evals = evals[: data_cfg.max_eval_rows]
    if not train:
        raise UserError(f"{source}: every row was dropped ({counts}); check the data format and data.columns")
    report.update(n_train=len(train), n_eval=len(evals))
    return PreferenceData(train=train, eval=evals, format=fmt, report=report)
