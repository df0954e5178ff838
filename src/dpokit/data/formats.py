"""Row shapes -> canonical rows {"prompt", "chosen", "rejected"}.

Canonical rows hold either three strings (plain text) or message lists: `prompt` is every turn before the final
assistant turn, `chosen`/`rejected` are one-message lists holding that final assistant turn.
Each format is a pair (detect, convert) in FORMATS; `convert` returns a canonical row, or None to drop the row,
and raises `RowError` for a malformed row.
"""

from __future__ import annotations

from collections.abc import Callable


class RowError(ValueError):
    """A malformed row: the message names the field and what is wrong."""


def is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _require(row: dict, *fields: str) -> None:
    for field in fields:
        if field not in row or row[field] is None:
            raise RowError(f"missing field {field!r}")


def _as_response(value, field: str):
    if isinstance(value, str):
        return value
    if is_messages(value):
        if not value or value[-1]["role"] != "assistant":
            raise RowError(f"field {field!r}: the last message must be an assistant turn")
        return [value[-1]]
    if isinstance(value, dict) and "role" in value and "content" in value:
        return [value]
    raise RowError(f"field {field!r}: expected a string or a list of {{role, content}} messages, got {type(value).__name__}")


def convert_explicit(row: dict) -> dict:
    _require(row, "prompt", "chosen", "rejected")
    prompt = row["prompt"]
    chosen, rejected = _as_response(row["chosen"], "chosen"), _as_response(row["rejected"], "rejected")
    if isinstance(prompt, str):
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            # A text prompt with message responses: lift the prompt to a user turn.
            prompt = [{"role": "user", "content": prompt}]
    elif is_messages(prompt):
        pass
    else:
        raise RowError(f"field 'prompt': expected a string or a list of messages, got {type(prompt).__name__}")
    if isinstance(prompt, list):
        chosen = chosen if isinstance(chosen, list) else [{"role": "assistant", "content": chosen}]
        rejected = rejected if isinstance(rejected, list) else [{"role": "assistant", "content": rejected}]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def detect_explicit(columns: set[str]) -> bool:
    return {"prompt", "chosen", "rejected"} <= columns


# name -> (detect(columns) -> bool, convert(row) -> canonical row | None). Order matters for detection.
FORMATS: dict[str, tuple[Callable[[set[str]], bool], Callable[[dict], dict | None]]] = {
    "explicit": (detect_explicit, convert_explicit),
}


def detect_format(columns: set[str]) -> str:
    for name, (detect, _) in FORMATS.items():
        if detect(columns):
            return name
    raise RowError(
        f"cannot tell the data format from columns {sorted(columns)}; set data.format (one of "
        f"{', '.join(FORMATS)}) or map your columns with data.columns, e.g. prompt=question,chosen=good,rejected=bad"
    )


def apply_column_map(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    out = dict(row)
    for canonical, theirs in columns.items():
        if theirs not in row:
            raise RowError(f"missing field {theirs!r} (mapped to {canonical!r} by data.columns)")
        out[canonical] = row[theirs]
    return out
