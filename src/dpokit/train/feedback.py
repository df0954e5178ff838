"""Ranked and unpaired (KTO) batches in training: per-response log-probs -> the losses' inputs, and the logged
metrics. The layout (one prefix-shared segment per prompt) is `dpokit.core.packing.collate_lists`."""

from __future__ import annotations

import torch

from dpokit.core.packing import as_matrix
from dpokit.train.losses import ListLogps, UnpairedLogps


def feedback_inputs(policy: torch.Tensor, ref: torch.Tensor | None, batch: dict) -> ListLogps | UnpairedLogps:
    """Per-response sums (S,) of a `collate_lists` batch -> ListLogps (ranked) or UnpairedLogps (each unpaired
    row holds [completion, mismatched KL completion])."""
    sizes = batch["group_sizes"]
    if "labels" in batch:
        p = policy.view(-1, 2)
        r = ref.view(-1, 2) if ref is not None else None
        return UnpairedLogps(policy=p[:, 0], label=batch["labels"].bool(), ref=None if r is None else r[:, 0],
                             kl_policy=p[:, 1], kl_ref=None if r is None else r[:, 1])
    n = batch.get("max_group")
    matrix, mask = as_matrix(policy, sizes, n=n)
    return ListLogps(policy=matrix, mask=mask, scores=batch["scores"].to(matrix.dtype),
                     ref=None if ref is None else as_matrix(ref.to(matrix.dtype), sizes, n=n)[0])


def feedback_metrics(lp: ListLogps | UnpairedLogps, beta: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (sum, count) over the batch, so processes' values combine exactly (sum of sums / sum of counts).

    Ranked: rewards/chosen and logps/chosen of the best response, .../rejected of the worst, rewards/accuracies the
    share of ordered (untied) pairs whose implicit rewards agree with the ranking. Unpaired (as TRL's KTOTrainer):
    rewards/chosen = mean beta * log-ratio of desirable rows, rewards/rejected of undesirable rows, kl = the batch's
    reference point z0."""
    one = lambda t: (t.detach().float().sum(), torch.tensor(float(t.numel()), device=t.device))  # noqa: E731
    if isinstance(lp, UnpairedLogps):
        r = beta * (lp.policy - lp.ref).detach()
        kl = (lp.kl_policy - lp.kl_ref).detach().float().mean().clamp(min=0)
        # masked sums, not boolean indexing (which reads the mask's count back from the device)
        where = lambda t, m: ((t.detach().float() * m).sum(), m.float().sum())  # noqa: E731
        return {"rewards/chosen": where(r, lp.label), "rewards/rejected": where(r, ~lp.label),
                "logps/chosen": where(lp.policy, lp.label), "logps/rejected": where(lp.policy, ~lp.label),
                "kl": (kl, torch.ones_like(kl))}
    r = lp.rewards(beta).detach()
    rows = torch.arange(r.shape[0], device=r.device)
    last = lp.mask.sum(-1) - 1
    ordered = lp.mask.unsqueeze(-1) & lp.mask.unsqueeze(-2) & (lp.scores.unsqueeze(-1) > lp.scores.unsqueeze(-2))
    agree = ((r.unsqueeze(-1) > r.unsqueeze(-2)) & ordered).sum()
    return {"rewards/chosen": one(r[:, 0]), "rewards/rejected": one(r[rows, last]),
            "rewards/margins": one(r[:, 0] - r[rows, last]),
            "rewards/accuracies": (agree.float(), ordered.sum().float()),
            "logps/chosen": one(lp.policy[:, 0]), "logps/rejected": one(lp.policy[rows, last])}
