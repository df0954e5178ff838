"""Padded batches of pairs and their sequence log-probabilities.

Layout: a batch of B pairs becomes 2B right-padded rows [chosen_1..B, rejected_1..B]; `loss_mask` marks the
response tokens whose log-probs are summed.
"""

from __future__ import annotations

import torch


def pad_pairs(pairs: list[dict], pad_id: int, keys=("chosen_ids", "rejected_ids")) -> dict[str, torch.Tensor]:
    """Rows [prompt + keys[0] of every pair, then prompt + keys[1], ...], right-padded."""
    seqs, masks = [], []
    for key in keys:
        for p in pairs:
            seqs.append(p["prompt_ids"] + p[key])
            masks.append([0] * len(p["prompt_ids"]) + [1] * len(p[key]))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m)
    batch = {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}
    if "ref_chosen_logps" in pairs[0]:
        batch["ref_chosen_logps"] = torch.tensor([p["ref_chosen_logps"] for p in pairs], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([p["ref_rejected_logps"] for p in pairs], dtype=torch.float32)
    return batch


class PairCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        return pad_pairs(pairs, self.pad_id)


# Image tensors a vision-language batch carries beside the text (`dpokit.core.vision`); the forward passes them on.
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes")


def image_inputs(batch: dict) -> dict:
    """The image tensors of a batch, as forward keyword arguments (none for a text batch)."""
    return {k: batch[k] for k in IMAGE_KEYS if k in batch}


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position, in fp32 whatever the model's dtype (half-precision log-softmax loses the
    small differences DPO depends on)."""
    logits = logits.float()
    return torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum of response-token log-probs per row, split into chosen/rejected halves, with token counts."""
    extra = image_inputs(batch)
    if "position_ids" in batch:
        extra["position_ids"] = batch["position_ids"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **extra).logits
    labels = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].to(torch.float32)
    per_token = token_logps(logits[:, :-1], labels) * mask
    sums, counts = per_token.sum(-1), mask.sum(-1)
    half = sums.shape[0] // 2
    return {"chosen": sums[:half], "rejected": sums[half:], "chosen_tokens": counts[:half],
            "rejected_tokens": counts[half:], "chosen_nll_sum": -sums[:half]}
