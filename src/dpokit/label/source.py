"""What `dpokit label serve` reads: JSONL with a prompt and two or more candidate answers per line.

Three shapes, detected per line (docs/labelling.md):
- `{"prompt": ..., "responses": [...]}` (optional `scores`, ignored for display): the documented shape, and what
  `dpokit data generate --keep-all` writes;
- `eval_samples.jsonl` rows of a run folder (`base` and `tuned` answers; `dpokit.core.run.EvalSample`);
- a response may be a string, a `{"role", "content"}` message or a list of messages (the last one's content is
  shown). A prompt is a string or a list of `{"role", "content"}` messages; a message's content may be a list of
  parts (`{"type": "text", "text": ...}`, `{"type": "image"}`), as in vision preference data.

Images (vision rows): `images`, a list of image file paths (relative to the source file's folder, or absolute), one
per `{"type": "image"}` part of the prompt, as `eval_samples.jsonl` of a vision run and TRL's vision format have
them. Each is checked to be a readable image before the DB is written; the items keep their absolute paths, the
page shows exactly those files (nothing else can be read through the server), and the export writes them back with
each pair, so the exported file trains again as vision data.

With more than two answers, two different ones are picked at random, seeded by the line number (the same file
always gives the same items). A line whose answers hold fewer than two *different* non-empty texts (identical
greedy answers, empty samples) has nothing to compare: it is skipped and counted, not an error.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpokit.core.errors import UserError

SHAPES_HINT = ('each line needs {"prompt": ..., "responses": [at least two answers]} (as `dpokit data generate '
               '--keep-all` writes) or an eval_samples.jsonl row with "base" and "tuned"')


@dataclass
class Item:
    line: int            # 1-based line in the source file
    prompt: Any          # a string or a list of {role, content} messages
    first: str           # the two answers compared, in source order
    second: str
    first_name: str      # where each answer came from: "responses[3]", "base", "tuned"
    second_name: str
    images: list[str] = field(default_factory=list)  # the prompt's image files (absolute paths), vision rows


def fingerprint(path: str | Path) -> str:
    """sha256 of the file's bytes: a label DB belongs to exactly one source."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _text(answer, where: str) -> str:
    """An answer as the text shown: a string, a message, or the last message of a list."""
    if isinstance(answer, list) and answer and isinstance(answer[-1], dict):
        answer = answer[-1]
    if isinstance(answer, dict) and isinstance(answer.get("content"), str):
        return answer["content"]
    if isinstance(answer, str):
        return answer
    raise UserError(f"{where}: expected a string or a {{role, content}} message, got {type(answer).__name__}")


def _is_content(content) -> bool:
    """Text, or a list of text / image parts."""
    return isinstance(content, str) or (isinstance(content, list) and all(
        isinstance(p, dict) and (p.get("type") == "image" or (p.get("type") == "text" and isinstance(p.get("text"), str)))
        for p in content))


def _check_prompt(prompt, where: str) -> None:
    ok = (isinstance(prompt, str) and prompt.strip()) or (
        isinstance(prompt, list) and prompt
        and all(isinstance(m, dict) and _is_content(m.get("content")) and "role" in m for m in prompt))
    if not ok:
        raise UserError(f"{where}: 'prompt' must be a non-empty string or a list of {{role, content}} messages "
                        "(content: text, or a list of {\"type\": \"text\"} / {\"type\": \"image\"} parts)")


def _images(row: dict, base: Path, where: str) -> list[str]:
    """The row's image files as absolute paths, each checked to be a readable image; [] for a text row."""
    from PIL import Image, UnidentifiedImageError

    from dpokit.data.vision import count_placeholders

    refs = row.get("images", [])
    if refs is None:
        refs = []
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise UserError(f"{where}: 'images' must be a list of image file paths; fix that line")
    parts = 0 if isinstance(row["prompt"], str) else sum(
        1 for m in row["prompt"] if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image")
    # a text row's prompt may well mention "<image>": placeholders in text count only when the row has images
    wanted = count_placeholders(row["prompt"]) if refs else parts
    if wanted != len(refs):
        raise UserError(f"{where}: the prompt has {wanted} image placeholder(s) ({{\"type\": \"image\"}} parts or "
                        f"<image>) and {len(refs)} image(s) in 'images'; give one image per placeholder")
    out = []
    for ref in refs:
        path = Path(ref).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise UserError(f"{where}: image {ref!r} not found (looked for {path}); give a path relative to the "
                            "source file's folder, or an absolute one")
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise UserError(f"{where}: image {ref!r} cannot be read ({type(err).__name__}); replace it with a PNG or "
                            "JPEG file") from None
        out.append(str(path.resolve()))
    return out


def _answers(row: dict, where: str) -> list[tuple[str, str]]:
    """(name, text) of every candidate answer of one row."""
    if "responses" in row:
        responses = row["responses"]
        if not isinstance(responses, list):
            raise UserError(f"{where}: 'responses' must be a list of answers, got {type(responses).__name__}")
        if len(responses) < 2:
            raise UserError(f"{where}: an item needs at least two answers to compare, got {len(responses)}; "
                            "add answers or remove the line")
        return [(f"responses[{i}]", _text(r, f"{where}: responses[{i}]")) for i, r in enumerate(responses)]
    if "base" in row and "tuned" in row:
        return [("base", _text(row["base"], f"{where}: base")), ("tuned", _text(row["tuned"], f"{where}: tuned"))]
    raise UserError(f"{where}: no answers; {SHAPES_HINT}")


def read_source(path: str | Path) -> tuple[list[Item], int]:
    """The items of a source file and how many lines were skipped (fewer than two different answers).

    Every malformed line is a UserError naming the file and line (nothing is served from a half-read file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; give a JSONL file of prompts with candidate answers ({SHAPES_HINT})")
    items: list[Item] = []
    skipped = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: invalid JSON ({err.msg}, column {err.colno}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object; {SHAPES_HINT}")
        if "prompt" not in row:
            raise UserError(f"{where}: missing 'prompt'; {SHAPES_HINT}")
        _check_prompt(row["prompt"], where)
        images = _images(row, path.parent.resolve(), where)
        seen: dict[str, str] = {}
        for name, text in _answers(row, where):
            if text.strip() and text not in seen:
                seen[text] = name
        if len(seen) < 2:
            skipped += 1
            continue
        # Seeded by the line number: the same file gives the same items, whoever serves it. Source order kept.
        candidates = [(name, text) for text, name in seen.items()]
        i, j = sorted(random.Random(lineno).sample(range(len(candidates)), 2))
        (a_name, a_text), (b_name, b_text) = candidates[i], candidates[j]
        items.append(Item(lineno, row["prompt"], a_text, b_text, a_name, b_name, images))
    if not items:
        raise UserError(f"{path}: no items with two different answers ({skipped} lines skipped); {SHAPES_HINT}")
    return items, skipped

