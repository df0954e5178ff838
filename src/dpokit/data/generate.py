"""On-policy preference pairs: sample N answers per prompt, score each with a judge, keep best vs worst.

This is how the DPO paper built its controlled-sentiment pairs, and how a reward model bootstraps preferences.
Entry points: `read_prompts(path)`, `generate_pairs(model, tokenizer, prompts, settings) -> (pairs, stats)`,
`generate_pairs_to_file(...)` (the `dpokit data generate` command).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpokit.errors import UserError
from dpokit.utils import write_jsonl

BUNDLED_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "quickstart_prompts.txt"


@dataclass
class PairSettings:
    """Sampling and selection settings; everything that changes the pairs is here (and in the cache key)."""

    num_samples: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    judge: str = "sentiment"
    judge_options: dict = field(default_factory=dict)
    min_gap: float = 0.1
    system_prompt: str | None = None
    dtype: str = "float32"  # sampling precision, resolved (never "auto"), so it is part of the cache key


def read_prompts(path: str | os.PathLike | None) -> list[str | list[dict]]:
    """Prompts from a .txt file (one a line; blank lines and lines starting with # skipped) or a .jsonl file (a
    `prompt` field per row: a string or a list of messages). None = the bundled quickstart prompts."""
    path = Path(os.path.expanduser(str(path))) if path else BUNDLED_PROMPTS
    if not path.is_file():
        raise UserError(f"--prompts: {path} not found; give a .txt (one prompt a line) or .jsonl (a 'prompt' field) file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    prompts: list = []
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: invalid JSON ({err.msg}); fix or remove that line") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            ok = isinstance(prompt, str) and prompt.strip() or (
                isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                           for m in prompt))
            if not ok:
                raise UserError(f"{path}:{lineno}: expected an object with a non-empty 'prompt' (string or list of "
                                "{role, content} messages)")
            prompts.append(prompt)
    elif suffix in (".txt", ""):
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    else:
        raise UserError(f"--prompts: {path}: unsupported file type {suffix!r}; use .txt or .jsonl")
    if not prompts:
        raise UserError(f"{path}: no prompts; write one prompt a line (.txt) or a 'prompt' field a row (.jsonl)")
    return prompts


def as_chat(prompt, tokenizer):
    """A string prompt becomes one user turn when the tokenizer has a chat template; otherwise it stays text."""
    if isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and not getattr(tokenizer, "chat_template", None):
        raise UserError("prompts are message lists but the tokenizer has no chat template; use plain-text prompts "
                        "or a chat model")
    return prompt


def select_pair(prompt, samples: list[str], scores: list[float], min_gap: float) -> dict | None:
    """Best vs worst of one prompt's samples; None when empty, tied, or closer than `min_gap`."""
    scored = [(s, t) for s, t in zip(scores, samples, strict=True) if t.strip()]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda x: x[0])
    worst = min(scored, key=lambda x: x[0])
    gap = best[0] - worst[0]
    if gap <= 0 or gap < min_gap or best[1] == worst[1]:
        return None
    if isinstance(prompt, list):
        chosen, rejected = [{"role": "assistant", "content": best[1]}], [{"role": "assistant", "content": worst[1]}]
    else:
        # Plain-text prompts: a leading space separates prompt and answer as a continuation would.
        chosen, rejected = " " + best[1], " " + worst[1]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "score_chosen": best[0], "score_rejected": worst[0]}


def generate_pairs(model, tokenizer, prompts: list, settings: PairSettings, progress=None) -> tuple[list[dict], dict]:
    """Canonical pairs (with `score_chosen`/`score_rejected`) and counts of what was kept and dropped."""
    from dpokit.eval.generation import generate
    from dpokit.eval.judges import build_judge

    if settings.num_samples < 2:
        raise UserError(f"--num-samples: {settings.num_samples}; need at least 2 samples per prompt to form a pair")
    judge = build_judge(settings.judge, settings.judge_options)
    chats = [as_chat(p, tokenizer) for p in prompts]
    samples = generate(model, tokenizer, chats, num_samples=settings.num_samples,
                       max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                       top_p=settings.top_p, seed=settings.seed, batch_size=settings.batch_size,
                       system_prompt=settings.system_prompt, progress=progress)
    flat_prompts = [c for c, s in zip(chats, samples, strict=True) for _ in s]
    flat_scores = judge.score(flat_prompts, [t for s in samples for t in s])
    pairs, start = [], 0
    for chat, group in zip(chats, samples, strict=True):
        scores = flat_scores[start:start + len(group)]
        start += len(group)
        pair = select_pair(chat, group, scores, settings.min_gap)
        if pair is not None:
            pairs.append(pair)
    mean_score = sum(flat_scores) / len(flat_scores) if flat_scores else float("nan")
    stats = {"prompts": len(prompts), "samples": len(flat_scores), "pairs": len(pairs),
             "dropped_ties_or_small_gap": len(prompts) - len(pairs), "mean_sample_score": mean_score,
             "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}  # what sampled, not what was asked
    return pairs, stats


def settings_key(model_id: str, prompts: list, settings: PairSettings, extra: dict | None = None) -> str:
    """Cache key of generated pairs: model identity + prompts + every sampling/selection setting."""
    blob = json.dumps({"model": model_id, "prompts": prompts, "settings": asdict(settings), "extra": extra or {}},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate_pairs_to_file(model_name: str, prompts_path: str | None, out: str, settings: PairSettings, *,
                           overwrite: bool = False) -> dict:
    """`dpokit data generate`: check the output path first, then sample, judge and write JSONL atomically."""
    from rich.progress import Progress

    from dpokit.models import load_model, load_tokenizer

    out_path = Path(out)
    if out_path.suffix.lower() != ".jsonl":
        raise UserError(f"--out: {out}: write pairs to a .jsonl file")
    if out_path.exists() and not overwrite:
        raise UserError(f"--out: {out} already exists; pass --overwrite to replace it or choose another path")
    if not 0.0 <= settings.min_gap:
        raise UserError(f"--min-gap: {settings.min_gap}; must be >= 0")
    if settings.num_samples < 2:
        raise UserError(f"--num-samples: {settings.num_samples}; need at least 2 samples per prompt to form a pair")
    prompts = read_prompts(prompts_path)
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=settings.dtype)
    with Progress(transient=False) as bar:
        task = bar.add_task("sampling", total=len(prompts) * settings.num_samples)
        pairs, stats = generate_pairs(model, tokenizer, prompts, settings,
                                      progress=lambda n: bar.advance(task, n))
    if not pairs:
        raise UserError(f"no pairs: all {len(prompts)} prompts gave ties or gaps under --min-gap {settings.min_gap}; "
                        "lower --min-gap or raise --num-samples")
    write_jsonl(out_path, pairs)
    return stats
