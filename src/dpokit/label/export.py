"""`dpokit label export`: the answers of a label DB as canonical pairs, plus agreement statistics.

Per item, the non-skip answers vote first / second / tie. The item becomes a pair when one answer has strictly more
votes than the other and than ties (majority with overlap > 1; the only vote with overlap 1); otherwise it is
counted as tied and written nowhere. Pairs are `{"prompt", "chosen", "rejected"}` (what `dpokit train` reads; a
message-list prompt gets one-message assistant lists), with `images` (the prompt's image files, absolute paths) for
a vision item, so the file trains as vision data, plus a `label` object: item, source line, votes and each
answer's annotator, choice, seconds spent, which answer was on the left, and reason.

Agreement, over items with two or more non-skip answers: percent agreement (the share of agreeing annotator pairs
per item, averaged), and kappa: Cohen's when exactly two people answered, Fleiss' otherwise (on the items with the
most common number of answers, as Fleiss' needs a fixed count per item). Left-position bias: how often the left
answer won among answers that picked a side, with its 95% Wilson interval (0.5 = no bias).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path

from dpokit.core.errors import UserError
from dpokit.core.io import write_jsonl
from dpokit.core.stats import proportion
from dpokit.label.store import connect, read_meta

CATEGORIES = ("first", "second", "tie")


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items: (p_o - p_e) / (1 - p_e), p_e from each rater's own
    label frequencies. None when undefined (no items, or both raters always give one and the same label)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    fa, fb = Counter(a), Counter(b)
    expected = sum(fa[c] * fb[c] for c in set(a) | set(b)) / (n * n)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(counts: list[list[int]]) -> float | None:
    """Fleiss' kappa from per-item category counts (every row sums to the same n >= 2 raters):
    P_i = (sum_j n_ij^2 - n) / (n (n - 1)), P = mean P_i, p_j = sum_i n_ij / (N n), P_e = sum_j p_j^2,
    kappa = (P - P_e) / (1 - P_e). None when undefined (no items, or every rating in one category)."""
    if not counts:
        return None
    n = sum(counts[0])
    assert n >= 2 and all(sum(row) == n for row in counts), counts
    big_n = len(counts)
    p_bar = sum((sum(x * x for x in row) - n) / (n * (n - 1)) for row in counts) / big_n
    p_e = sum((sum(row[j] for row in counts) / (big_n * n)) ** 2 for j in range(len(counts[0])))
    return None if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def percent_agreement(votes: list[list[str]]) -> float | None:
    """Share of agreeing annotator pairs within each item, averaged over items with two or more votes."""
    per_item = []
    for labels in votes:
        if len(labels) < 2:
            continue
        pairs = len(labels) * (len(labels) - 1) / 2
        per_item.append(sum(c * (c - 1) / 2 for c in Counter(labels).values()) / pairs)
    return sum(per_item) / len(per_item) if per_item else None


def agreement(rows: list[tuple[int, str, str]]) -> dict:
    """Agreement statistics from (item, annotator, choice) of non-skip answers."""
    by_item: dict[int, dict[str, str]] = defaultdict(dict)
    for item, annotator, choice in rows:
        by_item[item][annotator] = choice
    multi = {item: votes for item, votes in by_item.items() if len(votes) >= 2}
    annotators = sorted({a for votes in multi.values() for a in votes})
    kappa, kind, used = None, None, 0
    if len(annotators) == 2:
        both = [votes for votes in multi.values() if len(votes) == 2]
        kappa = cohen_kappa([v[annotators[0]] for v in both], [v[annotators[1]] for v in both])
        kind, used = "cohen", len(both)
    elif multi:
        size = Counter(len(v) for v in multi.values()).most_common(1)[0][0]
        counts = [[list(v.values()).count(c) for c in CATEGORIES] for v in multi.values() if len(v) == size]
        kappa, kind, used = fleiss_kappa(counts), "fleiss", len(counts)
    return {"items": len(multi), "percent": percent_agreement([list(v.values()) for v in multi.values()]),
            "kappa": kappa, "kappa_kind": kind, "kappa_items": used}


def _response(text: str, prompt):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def export_labels(db: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write the pairs of `db` to `out` (JSONL, atomically) and return the summary (docs/labelling.md)."""
    db, out = Path(db), Path(out)
    meta = read_meta(db)
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out {out}: write pairs to a .jsonl file")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it or choose another path")
    conn = connect(db)
    try:
        conn.row_factory = sqlite3.Row
        items = {r["id"]: r for r in conn.execute("SELECT * FROM items ORDER BY id")}
        labels = conn.execute("SELECT * FROM labels ORDER BY item, id").fetchall()
    finally:
        conn.close()
    by_item: dict[int, list[sqlite3.Row]] = defaultdict(list)
    for label in labels:
        by_item[label["item"]].append(label)
    pairs, tied = [], 0
    for item_id, answers in by_item.items():
        votes = Counter(a["choice"] for a in answers if a["choice"] != "skip")
        if not votes:
            continue
        winner = "first" if votes["first"] > max(votes["second"], votes["tie"]) else (
            "second" if votes["second"] > max(votes["first"], votes["tie"]) else None)
        if winner is None:
            tied += 1
            continue
        item = items[item_id]
        prompt = json.loads(item["prompt"])
        loser = "second" if winner == "first" else "first"
        role = {winner: "chosen", loser: "rejected", "tie": "tie", "skip": "skip"}
        images = json.loads(item["images"]) if "images" in item.keys() else []
        pairs.append({
            "prompt": prompt, "chosen": _response(item[winner], prompt), "rejected": _response(item[loser], prompt),
            **({"images": images} if images else {}),  # a vision pair: trains again as vision data
            "label": {
                "item": item_id, "source_line": item["line"],
                "chosen_from": item[f"{winner}_name"], "rejected_from": item[f"{loser}_name"],
                "votes": {"chosen": votes[winner], "rejected": votes[loser], "tie": votes["tie"],
                          "skip": sum(a["choice"] == "skip" for a in answers)},
                "answers": [{"annotator": a["annotator"], "choice": role[a["choice"]],
                             "left": role[a["left_answer"]], "seconds": round(a["answered_at"] - a["shown_at"], 3),
                             "reason": a["reason"]} for a in answers],
            },
        })
    write_jsonl(out, pairs)
    decided = [a for a in labels if a["choice"] in ("first", "second")]
    summary = {
        "db": str(db), "source": meta["source_path"], "out": str(out), "items": len(items),
        "labelled_items": sum(any(a["choice"] != "skip" for a in v) for v in by_item.values()),
        "pairs": len(pairs), "tied_items": tied, "answers": len(labels),
        "choices": {c: sum(a["choice"] == c for a in labels) for c in ("first", "second", "tie", "skip")},
        "annotators": dict(sorted(Counter(a["annotator"] for a in labels).items())),
        "agreement": agreement([(a["item"], a["annotator"], a["choice"]) for a in labels if a["choice"] != "skip"]),
        "left_chosen": (proportion([a["choice"] == a["left_answer"] for a in decided]).model_dump() if decided
                        else {"value": None, "ci": [None, None], "n": 0}),
    }
    return summary
