"""Row shapes -> canonical rows of three feedback kinds: pair {"prompt", "chosen", "rejected"}, ranked
{"prompt", "responses", "scores"} (best first) and unpaired {"prompt", "completion", "label"}.

Canonical rows hold either strings (plain text) or message lists: `prompt` is every turn before the final
assistant turn, each response a one-message list holding that final assistant turn. `as_kind` converts between
kinds (`data.kind`).
Each format is a pair (detect, convert) in FORMATS. `detect(row)` looks at the first row; `convert(row, opts)`
returns a canonical row, raises `Drop(reason)` for a row the format deliberately leaves out (a score tie), and
raises `RowError` for a malformed row.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from dpokit.core.errors import UserError


class RowError(ValueError):
    """A malformed row: the message names the field and what is wrong. `kind` groups errors in the report."""

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


class Drop(Exception):
    """A well-formed row that the format leaves out on purpose (e.g. tied scores); `reason` is counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ConvertOptions:
    """Settings the scored formats need (from DataConfig)."""

    pairing: str = "best_worst"
    min_score_gap: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(42))
    kind: str = "auto"  # data.kind: the feedback kind rows become (auto: the format's own)


def is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _require(row: dict, *fields: str) -> None:
    for name in fields:
        if name not in row or row[name] is None:
            raise RowError(f"missing field {name!r}", "missing_field")


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"field {where!r}: expected a string, got {type(value).__name__} ({str(value)[:40]!r})",
                       "non_string_content")
    return value


def _clean_messages(messages: list, where: str) -> list[dict]:
    """Keep only role and content, and insist that content is text."""
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and "role" in m and "content" in m):
            raise RowError(f"field '{where}[{i}]': expected a {{role, content}} message", "bad_shape")
        out.append({"role": _check_text(m["role"], f"{where}[{i}].role"),
                    "content": _check_text(m["content"], f"{where}[{i}].content")})
    return out


def _as_response(value, name: str):
    """A response field: a string, one assistant message, or a list whose last message is the assistant turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "role" in value and "content" in value:
        value = [value]
    if is_messages(value):
        if not value or value[-1]["role"] != "assistant":
            raise RowError(f"field {name!r}: the last message must be an assistant turn", "bad_shape")
        return _clean_messages(value[-1:], name)
    raise RowError(f"field {name!r}: expected a string or a list of {{role, content}} messages, "
                   f"got {type(value).__name__}", "non_string_content")


def _score(row: dict, name: str) -> float:
    try:
        return float(row[name])
    except (TypeError, ValueError):
        raise RowError(f"field {name!r}: expected a number, got {row[name]!r}", "bad_score") from None


def _check_gap(chosen_score: float, rejected_score: float, opts: ConvertOptions) -> None:
    if chosen_score == rejected_score:
        raise Drop("tied_scores")
    if abs(chosen_score - rejected_score) < opts.min_score_gap:
        raise Drop("score_gap_below_min")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# 1 + 2. Explicit prompt: strings, or messages ------------------------------------------------------------------

def convert_explicit(row: dict, opts: ConvertOptions | None = None) -> dict:
    _require(row, "prompt", "chosen", "rejected")
    prompt = row["prompt"]
    chosen, rejected = _as_response(row["chosen"], "chosen"), _as_response(row["rejected"], "rejected")
    if isinstance(prompt, str):
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            prompt = _user(prompt)  # a text prompt with message responses: lift the prompt to a user turn
    elif is_messages(prompt):
        prompt = _clean_messages(prompt, "prompt")
    else:
        raise RowError(f"field 'prompt': expected a string or a list of messages, got {type(prompt).__name__}",
                       "non_string_content")
    if isinstance(prompt, list):
        chosen = chosen if isinstance(chosen, list) else _assistant(chosen)
        rejected = rejected if isinstance(rejected, list) else _assistant(rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def detect_explicit(row: dict) -> bool:
    return {"prompt", "chosen", "rejected"} <= set(row)


# 3. Implicit prompt: whole conversations in chosen/rejected (message lists or HH-RLHF text) ----------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def is_hh_text(value) -> bool:
    return isinstance(value, str) and bool(re.search(r"(^|\n\n)Human:", value)) and "\n\nAssistant:" in value


def parse_hh(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{user: hi}, {assistant: hello}]."""
    if text.startswith("Human:"):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError(f"field {name!r}: text before the first '\\n\\nHuman:' turn ({parts[0][:40]!r})", "bad_shape")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _conversation(value, name: str) -> list[dict]:
    if is_hh_text(value):
        return parse_hh(value, name)
    if is_messages(value):
        return _clean_messages(value, name)
    raise RowError(f"field {name!r}: expected a conversation (list of messages or '\\n\\nHuman: ...\\n\\nAssistant: ...' "
                   f"text), got {type(value).__name__}", "non_string_content" if not isinstance(value, str) else "bad_shape")


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> dict:
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv or conv[-1]["role"] != "assistant":
            raise RowError(f"field {name!r}: the conversation must end with an assistant turn", "bad_shape")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("fields 'chosen'/'rejected': the conversations differ before the last assistant turn; "
                       "the prompt must be their shared history", "bad_shape")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def convert_implicit(row: dict, opts: ConvertOptions | None = None) -> dict:
    _require(row, "chosen", "rejected")
    return _split_conversations(_conversation(row["chosen"], "chosen"), _conversation(row["rejected"], "rejected"))


def detect_implicit(row: dict) -> bool:
    if "prompt" in row or not {"chosen", "rejected"} <= set(row):
        return False
    return all(is_hh_text(row[k]) or (is_messages(row[k]) and len(row[k]) > 1) for k in ("chosen", "rejected"))


# 4. UltraFeedback-binarized: prompt + chosen/rejected conversations that repeat the user turn ---------------------

def convert_ultrafeedback_binarized(row: dict, opts: ConvertOptions | None = None) -> dict:
    _require(row, "prompt", "chosen", "rejected")
    _check_text(row["prompt"], "prompt")
    chosen, rejected = _conversation(row["chosen"], "chosen"), _conversation(row["rejected"], "rejected")
    if "score_chosen" in row and "score_rejected" in row and row["score_chosen"] is not None:
        _check_gap(_score(row, "score_chosen"), _score(row, "score_rejected"), opts or ConvertOptions())
    if len(chosen) == 1 and len(rejected) == 1:  # only the answers: the prompt column is the user turn
        return {"prompt": _user(row["prompt"]), "chosen": _as_response(chosen, "chosen"),
                "rejected": _as_response(rejected, "rejected")}
    return _split_conversations(chosen, rejected)


def detect_ultrafeedback_binarized(row: dict) -> bool:
    if not detect_explicit(row) or not isinstance(row["prompt"], str):
        return False
    chosen = row["chosen"]
    return (is_messages(chosen) and len(chosen) > 1 and chosen[0]["role"] in ("user", "system")) or \
        {"score_chosen", "score_rejected"} <= set(row) and is_messages(chosen)


def convert_ultrafeedback_last_turn(row: dict, opts: ConvertOptions | None = None) -> dict:
    """The seed notebook's recipe: keep the `prompt` string; chosen/rejected = text of the last assistant message."""
    _require(row, "prompt", "chosen", "rejected")
    out = {"prompt": _check_text(row["prompt"], "prompt")}
    for name in ("chosen", "rejected"):
        response = _as_response(row[name], name)
        out[name] = response if isinstance(response, str) else response[-1]["content"]
    return out


# 5. Scored completions (UltraFeedback raw): instruction + completions[*].{response, overall_score} ---------------

def _completion(c, i: int) -> tuple[str, float]:
    if not isinstance(c, dict):
        raise RowError(f"field 'completions[{i}]': expected an object with response and overall_score", "bad_shape")
    text_key = next((k for k in ("response", "text", "completion") if k in c), None)
    score_key = next((k for k in ("overall_score", "score", "rating") if k in c), None)
    if text_key is None:
        raise RowError(f"missing field 'completions[{i}].response'", "missing_field")
    if score_key is None:
        raise RowError(f"missing field 'completions[{i}].overall_score'", "missing_field")
    text = _check_text(c[text_key], f"completions[{i}].{text_key}")
    try:
        return text, float(c[score_key])
    except (TypeError, ValueError):
        raise RowError(f"field 'completions[{i}].{score_key}': expected a number, got {c[score_key]!r}",
                       "bad_score") from None


def convert_scored(row: dict, opts: ConvertOptions | None = None) -> dict:
    opts = opts or ConvertOptions()
    prompt_key = "instruction" if "instruction" in row else "prompt"
    _require(row, prompt_key, "completions")
    prompt = _check_text(row[prompt_key], prompt_key)
    if not isinstance(row["completions"], list):
        raise RowError(f"field 'completions': expected a list, got {type(row['completions']).__name__}", "bad_shape")
    scored = [_completion(c, i) for i, c in enumerate(row["completions"])]
    if len(scored) < 2:
        raise Drop("fewer_than_two_completions")
    if opts.kind in ("ranked", "unpaired"):  # keep every completion; as_kind splits it further for unpaired
        return _ranked_row(_user(prompt), [_assistant(t) for t, _ in scored], [sc for _, sc in scored])
    best, other = _pick_pair([sc for _, sc in scored], opts)
    return {"prompt": _user(prompt), "chosen": _assistant(scored[best][0]), "rejected": _assistant(scored[other][0])}


def _pick_pair(scores: list[float], opts: ConvertOptions) -> tuple[int, int]:
    """(best, other) indices per data.pairing: other is the lowest, or (best_random) a random lower-scored one."""
    # First highest wins ties for "best" (stable and seed-free); the loser is the first lowest, or a random worse one.
    best = max(range(len(scores)), key=lambda i: scores[i])
    if opts.pairing == "best_random":
        worse = [i for i in range(len(scores)) if scores[i] < scores[best]]
        if not worse:
            raise Drop("tied_scores")
        other = opts.rng.choice(worse)
    else:
        other = min(range(len(scores)), key=lambda i: scores[i])
    _check_gap(scores[best], scores[other], opts)
    return best, other


def detect_scored(row: dict) -> bool:
    return "completions" in row and ("instruction" in row or "prompt" in row)


# 6. SHP: history + human_ref_A/B + labels (1 = A preferred) ----------------------------------------------------

def convert_shp(row: dict, opts: ConvertOptions | None = None) -> dict:
    _require(row, "history", "human_ref_A", "human_ref_B", "labels")
    history = _check_text(row["history"], "history")
    a, b = _check_text(row["human_ref_A"], "human_ref_A"), _check_text(row["human_ref_B"], "human_ref_B")
    label = str(row["labels"]).strip()
    if label not in ("0", "1", "True", "False", "true", "false"):
        raise RowError(f"field 'labels': expected 1 (A preferred) or 0 (B preferred), got {row['labels']!r}", "bad_label")
    a_wins = label in ("1", "True", "true")
    if "score_A" in row and "score_B" in row and row["score_A"] is not None:
        sa, sb = _score(row, "score_A"), _score(row, "score_B")
        _check_gap(*((sa, sb) if a_wins else (sb, sa)), opts or ConvertOptions())
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {"prompt": _user(history), "chosen": _assistant(chosen), "rejected": _assistant(rejected)}


def detect_shp(row: dict) -> bool:
    return {"history", "human_ref_A", "human_ref_B", "labels"} <= set(row)


# 7. Unpaired (TRL's unpaired preference format, KTO data): prompt, completion, label (bool) ----------------------

def _label(value) -> bool:
    # CSV cells arrive as text; JSON/Parquet give real booleans. Numbers and other words are refused: 1/0 or
    # "good"/"bad" are too easy to get backwards.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RowError(f"field 'label': expected a boolean (true = desirable, false = undesirable), got {value!r}",
                   "bad_label")


def _prompt_and_responses(prompt, responses: list) -> tuple:
    """A prompt and its responses in one shape: all text, or messages (a text prompt is lifted to a user turn)."""
    if is_messages(prompt):
        prompt = _clean_messages(prompt, "prompt")
    elif not isinstance(prompt, str):
        raise RowError(f"field 'prompt': expected a string or a list of messages, got {type(prompt).__name__}",
                       "non_string_content")
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses):
        return prompt, responses
    prompt = _user(prompt) if isinstance(prompt, str) else prompt
    return prompt, [r if isinstance(r, list) else _assistant(r) for r in responses]


def convert_unpaired(row: dict, opts: ConvertOptions | None = None) -> dict:
    _require(row, "prompt", "completion", "label")
    label = _label(row["label"])
    prompt, (completion,) = _prompt_and_responses(row["prompt"], [_as_response(row["completion"], "completion")])
    return {"prompt": prompt, "completion": completion, "label": label}


def detect_unpaired(row: dict) -> bool:
    return {"prompt", "completion", "label"} <= set(row)


# 8. Ranked lists: prompt, responses (>= 2), scores (higher is better) or ranks (1 = best) -----------------------

def _numbers(row: dict, name: str, n: int) -> list[float]:
    values = row[name]
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise RowError(f"field {name!r}: expected a list of {n} numbers (one per response), got {got}", "bad_score")
    try:
        if any(isinstance(v, bool) for v in values):
            raise TypeError
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise RowError(f"field {name!r}: expected numbers, got {values!r}", "bad_score") from None


def _ranked_row(prompt, responses: list, scores: list[float]) -> dict:
    """Canonical ranked row, best first (stable: tied responses keep their given order)."""
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    return {"prompt": prompt, "responses": [responses[i] for i in order], "scores": [scores[i] for i in order]}


def convert_ranked(row: dict, opts: ConvertOptions | None = None) -> dict:
    _require(row, "prompt", "responses")
    responses = row["responses"]
    if not isinstance(responses, list):
        raise RowError(f"field 'responses': expected a list, got {type(responses).__name__}", "bad_shape")
    if len(responses) < 2:
        raise RowError(f"field 'responses': a ranking needs at least 2 responses, got {len(responses)}", "too_few_responses")
    if ("scores" in row) == ("ranks" in row) or row.get("scores", row.get("ranks")) is None:
        raise RowError("expected exactly one of 'scores' (higher is better) or 'ranks' (1 = best)", "missing_field")
    if "scores" in row:
        scores = _numbers(row, "scores", len(responses))
    else:
        scores = [-r for r in _numbers(row, "ranks", len(responses))]  # rank 1 is best: score -1 > -2
    prompt, responses = _prompt_and_responses(
        row["prompt"], [_as_response(r, f"responses[{i}]") for i, r in enumerate(responses)])
    return _ranked_row(prompt, responses, scores)


def detect_ranked(row: dict) -> bool:
    return "prompt" in row and "responses" in row


# Converting between feedback kinds (data.kind) ---------------------------------------------------------------

def row_kind(row: dict) -> str:
    """The feedback kind of a canonical row."""
    return "ranked" if "responses" in row else "unpaired" if "completion" in row else "pair"


def as_kind(row: dict, kind: str, opts: ConvertOptions) -> list[dict]:
    """Canonical rows of `kind` from one canonical row: a pair splits into a desirable and an undesirable row, or
    becomes a two-response ranking; a ranking becomes its data.pairing pair (then rows, for unpaired)."""
    have = row_kind(row)
    if kind in ("auto", have):
        if have == "ranked" and len(set(row["scores"])) == 1:
            raise Drop("tied_scores")  # every response scored the same: the list says nothing
        return [row]
    if have == "unpaired":
        raise UserError(f"data.kind: {kind}, but the rows are unpaired (one completion with a label), which cannot "
                        "become pairs or rankings; set data.kind: unpaired and train.loss: kto")
    if have == "ranked":
        best, other = _pick_pair(row["scores"], opts)
        row = {"prompt": row["prompt"], "chosen": row["responses"][best], "rejected": row["responses"][other]}
        return as_kind(row, kind, opts)
    if kind == "ranked":
        return [{"prompt": row["prompt"], "responses": [row["chosen"], row["rejected"]], "scores": [1.0, 0.0]}]
    return [{"prompt": row["prompt"], "completion": row["chosen"], "label": True},
            {"prompt": row["prompt"], "completion": row["rejected"], "label": False}]


# name -> (detect(first row) -> bool, convert(row, opts) -> canonical row). Order matters for detection:
# specific shapes first, explicit last (UltraFeedback-binarized rows also have prompt/chosen/rejected).
FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[..., dict]]] = {
    "shp": (detect_shp, convert_shp),
    "scored": (detect_scored, convert_scored),
    "unpaired": (detect_unpaired, convert_unpaired),
    "ranked": (detect_ranked, convert_ranked),
    "ultrafeedback_binarized": (detect_ultrafeedback_binarized, convert_ultrafeedback_binarized),
    "implicit": (detect_implicit, convert_implicit),
    "explicit": (detect_explicit, convert_explicit),
    # Never auto-detected: the seed notebook's text-only recipe, chosen with data.format.
    "ultrafeedback_last_turn": (lambda row: False, convert_ultrafeedback_last_turn),
}

FORMAT_HELP = {
    "explicit": "prompt, chosen, rejected: three strings, or prompt messages + assistant message(s)",
    "implicit": "chosen, rejected: whole conversations (message lists or HH-RLHF '\\n\\nHuman: ... \\n\\nAssistant: ...' text)",
    "ultrafeedback_binarized": "prompt string + chosen/rejected conversations repeating the user turn "
                               "(+ optional score_chosen/score_rejected)",
    "scored": "instruction (or prompt) + completions[*].{response, overall_score}; binarised by data.pairing, or "
              "every completion kept with data.kind: ranked",
    "unpaired": "prompt, completion, label (true = desirable): TRL's unpaired preference format (KTO)",
    "ranked": "prompt, responses (>= 2), scores (higher is better) or ranks (1 = best)",
    "shp": "history, human_ref_A, human_ref_B, labels (1 = A preferred), optional score_A/score_B",
    "ultrafeedback_last_turn": "seed-notebook recipe: keep the prompt string, chosen/rejected = text of the last "
                               "assistant message (never auto-detected)",
}


def detect_format(row: dict) -> str:
    for name, (detect, _) in FORMATS.items():
        if detect(row):
            return name
    raise RowError(
        f"cannot tell the data format from columns {sorted(row)}; set data.format (one of "
        f"{', '.join(FORMATS)}) or map your columns with data.columns, e.g. prompt=question,chosen=good,rejected=bad"
    )


def apply_column_map(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    out = dict(row)
    for canonical, theirs in columns.items():
        if theirs not in row:
            raise RowError(f"missing field {theirs!r} (mapped to {canonical!r} by data.columns)", "missing_field")
        out[canonical] = row[theirs]
    return out


def parse_columns(text: str | None) -> dict[str, str]:
    """'prompt=question,chosen=response_j' -> {'prompt': 'question', 'chosen': 'response_j'}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        canonical, sep, theirs = item.partition("=")
        if not sep or not canonical.strip() or not theirs.strip():
            raise UserError(f"--columns {text!r}: expected canonical=yours pairs, e.g. "
                            "prompt=question,chosen=response_j,rejected=response_k")
        out[canonical.strip()] = theirs.strip()
    return out
