"""On-policy preference pairs: sample N answers per prompt, score each with a judge, keep best vs worst.

This is how the DPO paper built its controlled-sentiment pairs, and how a reward model bootstraps preferences.
Entry points: `read_prompts(path)`, `generate_pairs(model, tokenizer, prompts, pairs_cfg, dtype=...) -> (pairs,
stats)`, `generate_pairs_to_file(...)` (the `dpokit data generate` command). Every setting is the run config's
`pairs` section (`PairsConfig`), the one type shared by `dpokit quickstart` and `dpokit data generate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from dpokit.core.config import PairsConfig
from dpokit.core.errors import UserError
from dpokit.core.io import write_jsonl

BUNDLED_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "quickstart_prompts.txt"


# PairsConfig keys that pick *which* prompts are sampled, not how: the cache key holds the prompts themselves.
_PROMPT_SELECTION_KEYS = frozenset({"prompts", "num_prompts", "eval_prompts"})


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


def keep_all_row(prompt, samples: list[str], scores: list[float]) -> dict:
    """`--keep-all`: every sampled answer with its judge score, in sampling order: `{"prompt", "responses",
    "scores"}`, the ranked-list shape that `dpokit label serve` reads and `dpokit train` takes (`data.kind: ranked`).
    Answers are written as `select_pair` writes them (a leading space after a plain-text prompt)."""
    responses = list(samples) if isinstance(prompt, list) else [" " + t for t in samples]
    return {"prompt": prompt, "responses": responses, "scores": list(scores)}


def generate_pairs(model, tokenizer, prompts: list, pairs_cfg: PairsConfig, *, system_prompt: str | None = None,
                   dtype: str, progress=None, keep_all: bool = False) -> tuple[list[dict], dict]:
    """Canonical pairs (with `score_chosen`/`score_rejected`) and counts of what was kept and dropped.
    `keep_all`: one `keep_all_row` per prompt instead (every answer and its score; nothing dropped).

    `dtype`: the sampling precision (a name; "auto" is resolved by `pick_sampling_dtype`). The model is cast to it
    when it is in another dtype (sampling only, no gradients). `pairs_cfg.prompts`/`num_prompts`/`eval_prompts` are
    not read here: the caller picks `prompts`."""
    import torch

    from dpokit.core.judges import build_judge
    from dpokit.core.models import pick_sampling_dtype
    from dpokit.core.sampling import generate

    dtype = pick_sampling_dtype(dtype)
    if next(model.parameters()).dtype != getattr(torch, dtype):
        model.to(getattr(torch, dtype))
    judge = build_judge(pairs_cfg.judge, dict(pairs_cfg.judge_options), key="pairs")
    chats = [as_chat(p, tokenizer) for p in prompts]
    samples = generate(model, tokenizer, chats, num_samples=pairs_cfg.num_samples,
                       max_new_tokens=pairs_cfg.max_new_tokens, temperature=pairs_cfg.temperature,
                       top_p=pairs_cfg.top_p, seed=pairs_cfg.seed, batch_size=pairs_cfg.batch_size,
                       system_prompt=system_prompt, progress=progress, engine=pairs_cfg.engine)
    flat_prompts = [c for c, s in zip(chats, samples, strict=True) for _ in s]
    flat_scores = judge.score(flat_prompts, [t for s in samples for t in s])
    pairs, start = [], 0
    for chat, group in zip(chats, samples, strict=True):
        scores = flat_scores[start:start + len(group)]
        start += len(group)
        pair = keep_all_row(chat, group, scores) if keep_all else select_pair(chat, group, scores, pairs_cfg.min_gap)
        if pair is not None:
            pairs.append(pair)
    mean_score = sum(flat_scores) / len(flat_scores) if flat_scores else float("nan")
    stats = {"prompts": len(prompts), "samples": len(flat_scores), "pairs": len(pairs),
             "dropped_ties_or_small_gap": len(prompts) - len(pairs), "mean_sample_score": mean_score,
             "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}  # what sampled, not what was asked
    return pairs, stats


def settings_key(model_id: str, prompts: list, pairs_cfg: PairsConfig, *, system_prompt: str | None, dtype: str,
                 extra: dict | None = None) -> str:
    """Cache key of generated pairs: model identity + the prompts + every setting that changes the pairs: all of
    `pairs_cfg` (sampling, judge and its options, selection, seed, batch size: it changes the RNG batching) except
    the keys that only pick the prompts, with the dtype resolved (never "auto") and the system prompt."""
    from dpokit.core.models import pick_sampling_dtype

    settings = pairs_cfg.model_dump(mode="json", exclude=set(_PROMPT_SELECTION_KEYS))
    settings.update(dtype=pick_sampling_dtype(dtype), system_prompt=system_prompt)
    blob = json.dumps({"model": model_id, "prompts": prompts, "settings": settings, "extra": extra or {}},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def take_prompts(prompts: list, pairs_cfg: PairsConfig) -> list:
    """`pairs.num_prompts`: the first N prompts after a shuffle seeded by `pairs.seed` (as `dpokit quickstart`
    picks them); None = every prompt, in file order."""
    if not pairs_cfg.num_prompts:
        return list(prompts)
    order = list(range(len(prompts)))
    random.Random(pairs_cfg.seed).shuffle(order)
    return [prompts[i] for i in order[: pairs_cfg.num_prompts]]


def split_prompts(prompts: list, gen) -> tuple[list, list]:
    """Seeded shuffle, optional cap, then the first `eval_prompts` are held out."""
    order = list(range(len(prompts)))
    random.Random(gen.seed).shuffle(order)
    if gen.num_prompts:
        order = order[: gen.num_prompts]
    if len(order) <= gen.eval_prompts:
        raise UserError(f"pairs.eval_prompts: {gen.eval_prompts} held-out prompts leave none of the "
                        f"{len(order)} prompts for training; lower eval_prompts or add prompts")
    held = [prompts[i] for i in order[: gen.eval_prompts]]
    train = [prompts[i] for i in order[gen.eval_prompts:]]
    return train, held


def pair_settings(cfg) -> dict:
    """What `generate_pairs` and `settings_key` take besides `cfg.pairs`: the system prompt and the resolved
    sampling dtype (never "auto", so the cache key says what sampled)."""
    from dpokit.core.models import pick_sampling_dtype

    return {"system_prompt": cfg.data.system_prompt, "dtype": pick_sampling_dtype(cfg.pairs.dtype)}


def model_identity(cfg) -> dict:
    """What identifies the sampling model in the pairs' cache key (a folder also by its weights' mtimes)."""
    from dpokit.core.models import resolve_model_path

    ident = {"name": cfg.model.name_or_path, "revision": cfg.model.revision, "dtype": cfg.model.dtype,
             "tokenizer": cfg.model.tokenizer, "chat_template": cfg.data.chat_template}
    path = Path(resolve_model_path(cfg.model.name_or_path))
    if path.is_dir():
        ident["files"] = sorted((p.name, int(p.stat().st_mtime)) for p in path.glob("*.safetensors"))
    return ident


def generate_pairs_to_file(model_name: str, out: str, pairs_cfg: PairsConfig, *, system_prompt: str | None = None,
                           overwrite: bool = False, keep_all: bool = False) -> dict:
    """`dpokit data generate`: check the output path and read the prompts first, then load the model, sample,
    judge and write JSONL atomically. Prompts come from `pairs_cfg.prompts` (capped by `pairs_cfg.num_prompts`)."""
    from rich.progress import Progress

    from dpokit.core.models import load_model, load_tokenizer, pick_sampling_dtype

    out_path = Path(out)
    if out_path.suffix.lower() != ".jsonl":
        raise UserError(f"--out: {out}: write pairs to a .jsonl file")
    if out_path.exists() and not overwrite:
        raise UserError(f"--out: {out} already exists; pass --overwrite to replace it or choose another path")
    prompts = take_prompts(read_prompts(pairs_cfg.prompts), pairs_cfg)
    dtype = pick_sampling_dtype(pairs_cfg.dtype)
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=dtype)
    with Progress(transient=False) as bar:
        task = bar.add_task("sampling", total=len(prompts) * pairs_cfg.num_samples)
        pairs, stats = generate_pairs(model, tokenizer, prompts, pairs_cfg, system_prompt=system_prompt, dtype=dtype,
                                      progress=lambda n: bar.advance(task, n), keep_all=keep_all)
    if not pairs:
        raise UserError(f"no pairs: all {len(prompts)} prompts gave ties or gaps under pairs.min_gap (--min-gap) "
                        f"{pairs_cfg.min_gap}; lower pairs.min_gap or raise pairs.num_samples")
    write_jsonl(out_path, pairs)
    return stats
