"""Checks on canonical rows that need no tokenizer: empty fields, duplicates, tied scores, prompts shared across
splits.

Every check gives a count and up to three examples (`where` names the file and line/row), so the report says
what it found and where to look.
"""

from __future__ import annotations

import json

from dpokit.core.run import Examples, LabelCounts, RowChecks, SharedPrompts

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

    def as_model(self) -> Examples:
        return Examples(count=self.count, examples=self.examples)


def text_of(value) -> str:
    """The text a field carries: the string, or the messages' contents joined."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] for m in value)


def _is_empty(value) -> bool:
    return not text_of(value).strip() or (isinstance(value, list) and any(not m["content"].strip() for m in value))


def row_checks(rows: list[dict], locations: list[str]) -> RowChecks:
    """Empty fields and exact duplicate rows (both kept, reported). Ranked rows also count tied scores and
    repeated responses within a list; unpaired rows count desirable and undesirable labels."""
    if rows and "responses" in rows[0]:
        return _ranked_checks(rows, locations)
    fields = ("prompt", "completion") if rows and "completion" in rows[0] else ("prompt", "chosen", "rejected")
    empty = {name: Tally() for name in fields}
    duplicates = Tally()
    seen: dict[str, str] = {}
    for row, where in zip(rows, locations, strict=True):
        for name, tally in empty.items():
            if _is_empty(row[name]):
                tally.add(where, **{name: row[name]})
        key = json.dumps([row[name] for name in fields] + [row.get("label")], ensure_ascii=False, sort_keys=True)
        if key in seen:
            duplicates.add(where, first_seen=seen[key], prompt=row["prompt"])
        else:
            seen[key] = where
    empty_fields = {name: t.as_model() for name, t in empty.items()}
    if "completion" in fields:
        desirable = sum(bool(r["label"]) for r in rows)
        return RowChecks(empty_fields=empty_fields, duplicate_rows=duplicates.as_model(),
                         labels=LabelCounts(desirable=desirable, undesirable=len(rows) - desirable))
    return RowChecks(empty_fields=empty_fields, duplicate_pairs=duplicates.as_model())


def _ranked_checks(rows: list[dict], locations: list[str]) -> RowChecks:
    empty = {"prompt": Tally(), "responses": Tally()}
    duplicates, ties, repeated = Tally(), Tally(), Tally()
    seen: dict[str, str] = {}
    sizes: dict[int, int] = {}
    for row, where in zip(rows, locations, strict=True):
        if _is_empty(row["prompt"]):
            empty["prompt"].add(where, prompt=row["prompt"])
        if any(_is_empty(r) for r in row["responses"]):
            empty["responses"].add(where, responses=row["responses"])
        if len(set(row["scores"])) < len(row["scores"]):
            ties.add(where, scores=row["scores"])
        texts = [text_of(r) for r in row["responses"]]
        if len(set(texts)) < len(texts):
            repeated.add(where, responses=row["responses"])
        sizes[len(texts)] = sizes.get(len(texts), 0) + 1
        key = json.dumps([row["prompt"], row["responses"], row["scores"]], ensure_ascii=False, sort_keys=True)
        if key in seen:
            duplicates.add(where, first_seen=seen[key], prompt=row["prompt"])
        else:
            seen[key] = where
    return RowChecks(empty_fields={name: t.as_model() for name, t in empty.items()},
                     duplicate_rows=duplicates.as_model(),
                     tied_scores=ties.as_model(),  # kept: listwise_pairs skips tied pairs, listwise_pl keeps the order
                     repeated_responses=repeated.as_model(),
                     responses_per_row={str(k): v for k, v in sorted(sizes.items())})


def shared_prompts(train: list[dict], evals: list[dict], key) -> SharedPrompts:
    """Eval pairs whose prompt also appears in train (a split by prompt gives 0)."""
    train_keys = {key(r["prompt"]) for r in train}
    tally, distinct = Tally(), set()
    for i, row in enumerate(evals, start=1):
        k = key(row["prompt"])
        if k in train_keys:
            distinct.add(k)
            tally.add(f"eval row {i}", prompt=row["prompt"])
    return SharedPrompts(eval_pairs=tally.count, distinct_prompts=len(distinct), examples=tally.examples)
