"""Checks on canonical rows that need no tokenizer: empty fields, duplicates, prompts shared across splits.

Every check gives a count and up to three examples (`where` names the file and line/row), so the report says
what it found and where to look.
"""

from __future__ import annotations

import json

MAX_EXAMPLES = 3


def preview(value, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Tally:
    """A count plus the first few examples."""

    def __init__(self):
        self.count = 0
        self.examples: list[dict] = []

    def add(self, where: str, **details) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": where, **{k: preview(v) for k, v in details.items()}})

    def as_dict(self) -> dict:
        return {"count": self.count, "examples": self.examples}


def text_of(value) -> str:
    """The text a field carries: the string, or the messages' contents joined."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] for m in value)


def row_checks(rows: list[dict], locations: list[str]) -> dict:
    """Empty fields and exact duplicate pairs (both kept, reported)."""
    empty = {name: Tally() for name in ("prompt", "chosen", "rejected")}
    duplicates = Tally()
    seen: dict[str, str] = {}
    for row, where in zip(rows, locations, strict=True):
        for name, tally in empty.items():
            value = row[name]
            if not text_of(value).strip() or (isinstance(value, list) and any(not m["content"].strip() for m in value)):
                tally.add(where, **{name: value})
        key = json.dumps([row["prompt"], row["chosen"], row["rejected"]], ensure_ascii=False, sort_keys=True)
        if key in seen:
            duplicates.add(where, first_seen=seen[key], prompt=row["prompt"])
        else:
            seen[key] = where
    return {"empty_fields": {name: t.as_dict() for name, t in empty.items()},
            "duplicate_pairs": duplicates.as_dict()}


def shared_prompts(train: list[dict], evals: list[dict], key) -> dict:
    """Eval pairs whose prompt also appears in train (a split by prompt gives 0)."""
    train_keys = {key(r["prompt"]) for r in train}
    tally, distinct = Tally(), set()
    for i, row in enumerate(evals, start=1):
        k = key(row["prompt"])
        if k in train_keys:
            distinct.add(k)
            tally.add(f"eval row {i}", prompt=row["prompt"])
    return {"eval_pairs": tally.count, "distinct_prompts": len(distinct), "examples": tally.examples}
