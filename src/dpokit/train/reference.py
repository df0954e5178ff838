"""Precomputed reference log-probs, cached on disk and reused across runs (e.g. every run of a beta sweep).

The cache file lives in `<dpokit cache>/reference_logps/<key>.json`; the key hashes (reference model fingerprint,
tokenized dataset fingerprint, chat template, max_length), so any later run whose reference and tokenized pairs
match loads the numbers and performs no reference forward pass. The values are attached to each encoded pair as
`ref_chosen_logps` / `ref_rejected_logps`, the per-pair fields every collator passes into batches; ranked and
unpaired rows get `ref_logps`, one value per response (an unpaired row's second: its mismatched KL completion).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from dpokit.core.io import atomic_write_text
from dpokit.core.models import cache_dir, fingerprint_model
from dpokit.core.scoring import feedback_logps, pair_logps, pairs_fingerprint

log = logging.getLogger(__name__)


def cache_key(model_fp: str, data_fp: str, template: str | None, max_length: int) -> str:
    raw = json.dumps({"model": model_fp, "data": data_fp, "template": template or "", "max_length": max_length})
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    return cache_dir() / "reference_logps" / f"{key}.json"


def compute_logps(model, pairs: list[dict], pad_id: int, batch_size: int, packing: bool = True) -> list[list[float]]:
    """[[ref_chosen, ref_rejected], ...] for every pair (the same forward evaluation uses)."""
    was_training = model.training
    if pairs and "responses_ids" in pairs[0]:  # ranked / unpaired: one value per response
        values, _ = feedback_logps(model, pairs, pad_id, batch_size, packing)
        model.train(was_training)
        return values
    res = pair_logps(model, pairs, pad_id, batch_size, packing)
    model.train(was_training)
    return [[c, r] for c, r in zip(res["chosen"], res["rejected"], strict=True)]


def attach(pairs: list[dict], values: list[list[float]]) -> None:
    for pair, value in zip(pairs, values, strict=True):
        if "responses_ids" in pair:
            pair["ref_logps"] = list(value)
        else:
            pair["ref_chosen_logps"], pair["ref_rejected_logps"] = value


def _all_gather(obj, world: int) -> list:
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def precompute(ref_model, train_pairs: list[dict], eval_pairs: list[dict], *, pad_id: int, template: str | None,
               max_length: int, batch_size: int, packing: bool = True, refresh: bool = False,
               rank: int = 0, world: int = 1) -> dict:
    """Attach reference log-probs to the pairs, from the cache when it matches; returns what happened
    (`cache`: hit/miss, `forwards`: reference forward passes done by this process, `path`).

    With `world` processes (a launcher) each computes every world-th pair from its `rank` and the values are
    gathered, so the work is split, not repeated; the cache is used only when every process finds it (nodes may
    not share a disk)."""
    key = cache_key(fingerprint_model(ref_model), pairs_fingerprint(train_pairs, eval_pairs), template, max_length)
    path = cache_path(key)
    stored = None
    if path.is_file() and not refresh:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if len(stored["train"]) != len(train_pairs) or len(stored["eval"]) != len(eval_pairs):
            stored = None
    if world > 1 and not all(_all_gather(stored is not None, world)):
        stored = None
    if stored is not None:
        attach(train_pairs, stored["train"])
        attach(eval_pairs, stored["eval"])
        log.info("reference log-probs loaded from %s (no reference forward)", path)
        return {"cache": "hit", "forwards": 0, "path": str(path)}
    everything = train_pairs + eval_pairs
    shard = everything[rank::world]
    values = compute_logps(ref_model, shard, pad_id, batch_size, packing)
    if world > 1:
        parts, values = _all_gather(values, world), [None] * len(everything)
        for r, part in enumerate(parts):
            values[r::world] = part
    train_values, eval_values = values[:len(train_pairs)], values[len(train_pairs):]
    if rank == 0:  # the held-out values also go into the run folder (trainer.write_run_start) for evaluation
        atomic_write_text(path, json.dumps({"key": key, "train": train_values, "eval": eval_values}))
    attach(train_pairs, train_values)
    attach(eval_pairs, eval_values)
    forwards = -(-len(shard) // batch_size)
    log.info("reference log-probs computed (%d forwards on this process, %d processes) and cached in %s",
             forwards, world, path)
    return {"cache": "miss", "forwards": forwards, "processes": world, "path": str(path)}
