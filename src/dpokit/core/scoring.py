"""Log-prob scoring shared by every stage: summed response log-probs of encoded pairs (eval, the reference
precompute) and of sampled answers (KL). Training scores its batches with `dpokit.core.packing.batch_logps`."""

from __future__ import annotations

import hashlib
import json

import torch

from dpokit.core.batching import IMAGE_KEYS, pad_pairs, token_logps
from dpokit.core.packing import (
    batch_logps,
    collate_lists,
    list_logps,
    pack_pairs,
    packing_self_check,
    probe_pair,
    to_device,
)
from dpokit.core.vision import is_vision_pair, pack_vision_pairs


@torch.no_grad()
def pairs_fingerprint(*splits: list[dict]) -> str:
    """Hash of the token ids of every pair, split by split (order matters: values are stored by position)."""
    h = hashlib.sha256()
    for split in splits:
        h.update(b"\x00split")
        for p in split:
            if "responses_ids" in p:  # ranked / unpaired rows (an unpaired row's second response: its KL completion)
                h.update(json.dumps([p["prompt_ids"], p["responses_ids"]]).encode())
            else:
                h.update(json.dumps([p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]]).encode())
            for key in IMAGE_KEYS:  # vision pairs: the images as the model sees them (pixels after the processor)
                if key in p:
                    tensor = p[key].detach().cpu().contiguous()
                    h.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
                    h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.dtype == torch.bfloat16
                             else tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def pair_logps(model, encoded: list[dict], pad_id: int, batch_size: int = 8,
               packing: bool = True) -> dict[str, list[float]]:
    """Summed response log-probs and token counts for every encoded pair.

    packing (`train.layout`): the packed layout (prompt once, LM head on response tokens only; 1.5x faster on a
    CPU) when the model passes the packing self-check, else padded rows. Both give the same sums.
    """
    device = next(model.parameters()).device
    out = {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": []}
    if encoded and is_vision_pair(encoded[0]):  # image pairs: training's layout, each image encoded once
        collate = pack_vision_pairs
    else:
        packed = packing and bool(encoded) and packing_self_check(model, encoded[0], pad_id) is None
        collate = pack_pairs if packed else pad_pairs
    model.eval()
    for start in range(0, len(encoded), batch_size):
        batch = to_device(collate(encoded[start:start + batch_size], pad_id), device)
        res = batch_logps(model, batch)
        for key in out:
            out[key].extend(res[key].float().cpu().tolist())
    return out


@torch.no_grad()
def feedback_logps(model, encoded: list[dict], pad_id: int, batch_size: int = 8,
                   packing: bool = True) -> tuple[list[list[float]], list[list[int]]]:
    """Summed log-probs and token counts of every response of ranked or unpaired rows (`responses_ids`), per row;
    packed (one prefix-shared segment per row) when the model passes the packing self-check, else padded."""
    device = next(model.parameters()).device
    packed = packing and bool(encoded) and packing_self_check(model, probe_pair(encoded[0]), pad_id) is None
    model.eval()
    values: list[list[float]] = []
    counts: list[list[int]] = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        batch = to_device(collate_lists(rows, pad_id, packed), device)
        sums, tokens = (t.float().cpu().tolist() for t in list_logps(model, batch))
        for r in rows:
            n = len(r["responses_ids"])
            values.append(sums[:n])
            counts.append([int(c) for c in tokens[:n]])
            sums, tokens = sums[n:], tokens[n:]
    return values, counts


@torch.no_grad()
def response_logps(model, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
                   batch_size: int = 8) -> tuple[list[float], list[int]]:
    """Summed log-prob of each response given its prompt (right padding), and the response token counts."""
    device = next(model.parameters()).device
    model.eval()
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, responses = prompt_ids[start:start + batch_size], response_ids[start:start + batch_size]
        seqs = [p + r for p, r in zip(prompts, responses, strict=False)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=False)):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attention[i, :len(p) + len(r)] = 1
            mask[i, len(p):len(p) + len(r)] = 1
        ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        per_token = token_logps(logits[:, :-1], ids[:, 1:]) * mask[:, 1:]
        sums.extend(per_token.sum(-1).float().cpu().tolist())
        counts.extend(mask[:, 1:].sum(-1).cpu().tolist())
    return sums, counts
