"""Training-only batching: token-budget batch sampling, the collator choice and the Trainer hooks they need.

The packed layout and its log-prob scoring live in `dpokit.core.packing` (eval and the reference precompute use
them too).
"""

from __future__ import annotations

import logging
import random

import torch

from dpokit.core.attention import flex_unavailable, varlen_unavailable
from dpokit.core.batching import PairCollator
from dpokit.core.packing import (
    ListCollator,
    PackedPairCollator,
    batch_num_pairs,
    packing_self_check,
    pair_length,
    probe_pair,
)

log = logging.getLogger(__name__)


class TokenBudgetBatchSampler:
    """Length-grouped batches of pair indices, each holding at most `max_tokens` prefix-shared tokens (a pair
    longer than the budget gets a batch of its own). The batches are fixed from `seed`; each epoch visits them in
    an order drawn from (seed, epoch), so a resumed run sees the same data order."""

    def __init__(self, lengths: list[int], max_tokens: int, seed: int = 0, max_pairs: int | None = None):
        rng = random.Random(seed)
        tiebreak = [rng.random() for _ in lengths]
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tiebreak[i]))
        self.batches: list[list[int]] = []
        current, used = [], 0
        for i in order:
            full = max_pairs is not None and len(current) >= max_pairs
            if current and (used + lengths[i] > max_tokens or full):
                self.batches.append(current)
                current, used = [], 0
            current.append(i)
            used += lengths[i]
        if current:
            self.batches.append(current)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        order = list(range(len(self.batches)))
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        for b in order:
            yield list(self.batches[b])


def attention_candidates(train_cfg, cuda: bool) -> list[str]:
    """Packed backends to try, in order (`train.layout`); empty: padded batches."""
    if not train_cfg.packed:
        return []
    if train_cfg.layout == "auto":
        return ["varlen", "flex", "dense"] if cuda else ["dense"]  # CPU: dense is today's fastest there
    return [train_cfg.layout] + ([] if train_cfg.layout == "dense" else ["dense"])


def _backend_problem(attention: str, models, probe: dict, pad_id: int, autocast=None) -> str | None:
    """Why `attention` cannot train these models (kernel missing, or the self-check disagrees), or None."""
    unavailable = {"varlen": varlen_unavailable, "flex": flex_unavailable}.get(attention)
    reason = unavailable() if unavailable else None
    if reason is not None:
        return reason
    for name, m in models:
        reason = packing_self_check(m, probe, pad_id, attention=attention, autocast=autocast)
        if reason is not None:
            return f"{name} model {type(m).__name__}: {reason}"
    return None


def choose_collator(train_cfg, model, ref_model, pairs: list[dict], pad_id: int, autocast=None):
    """(collator, batch sampler or None) for training. Packing uses the first backend of `attention_candidates`
    whose kernels exist here and whose self-check (packed vs padded log-probs) passes on the policy and on a
    separate reference model, under the training's autocast dtype (`autocast`: torch.bfloat16 / float16 or None);
    a backend passed over is logged in one line with the reason. When none passes: the padded path, with a one-line
    warning saying why. The collator's `attention` names the backend used ("padded" for padded batches) and its
    `passed_over` maps each backend tried and refused to the reason."""
    lists = bool(pairs) and "responses_ids" in pairs[0]  # ranked / unpaired rows
    padded = ListCollator(pad_id, packed=False) if lists else PairCollator(pad_id)
    padded.attention, padded.passed_over = "padded", {}
    candidates = attention_candidates(train_cfg, torch.cuda.is_available())
    if not candidates or not pairs:
        return padded, None
    probes = [probe_pair(p) for p in pairs[:64]]
    probe = max(probes, key=lambda p: min(len(p["prompt_ids"]), 1) * (len(p["chosen_ids"]) + len(p["rejected_ids"])))
    models = [(name, m) for name, m in (("policy", model), ("reference", ref_model)) if m is not None]
    passed_over = {}  # backend -> why not: recorded in train_summary.json
    for i, attention in enumerate(candidates):
        reason = _backend_problem(attention, models, probe, pad_id, autocast)
        if reason is None:
            break
        passed_over[attention] = reason
        if i + 1 == len(candidates):
            log.warning("train.layout: falling back to padded batches: %s", reason)
            padded.passed_over = passed_over
            return padded, None
        explicit = train_cfg.layout == attention
        (log.warning if explicit else log.info)("train.layout: %s not used, trying %s: %s", attention,
                                                candidates[i + 1], reason)
    log.info("train.layout: %s", attention)
    sampler = None
    if train_cfg.max_tokens_per_batch:
        sampler = TokenBudgetBatchSampler([pair_length(p) for p in pairs], train_cfg.max_tokens_per_batch,
                                          seed=train_cfg.seed)
    collator = ListCollator(pad_id, attention=attention) if lists else PackedPairCollator(pad_id, attention=attention)
    collator.passed_over = passed_over
    return collator, sampler


class PackingTrainerMixin:
    """Trainer overrides for token-budget batches: a length-grouped batch sampler for training, and the pair count
    of each optimizer step (over its micro-batches) so the loss is normalised per pair whatever the batch sizes."""

    token_budget_sampler: TokenBudgetBatchSampler | None = None

    def get_train_dataloader(self):
        if self.token_budget_sampler is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        loader = DataLoader(self.train_dataset, batch_sampler=self.token_budget_sampler,
                            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    # Workaround: transformers.Trainer counts "items" for loss normalisation with the private
    # `Trainer._get_num_items_in_batch` (label tokens != -100), which means nothing for pairs. Overridden to count the
    # pairs of the step's micro-batches (transformers 5.x); remove if Trainer gains a public hook for the item count.
    def _get_num_items_in_batch(self, batch_samples: list, device):
        if self.token_budget_sampler is None:
            return super()._get_num_items_in_batch(batch_samples, device)
        return sum(batch_num_pairs(b) for b in batch_samples)
