"""DPO-family losses: pure functions of sequence log-probabilities.

Each loss takes a `PairLogps` (policy and reference log-probs summed over response tokens, plus token counts) and
the train config, and returns per-pair losses. Rewards and metrics are computed by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    chosen: torch.Tensor  # (B,) sum of log pi(y_w | x) over response tokens
    rejected: torch.Tensor  # (B,)
    ref_chosen: torch.Tensor | None = None  # (B,) same under the reference policy
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None  # (B,) response token counts
    rejected_tokens: torch.Tensor | None = None

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected


def sigmoid_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7), with cDPO label smoothing eps (Mitchell 2023):
    L = -(1-eps) log sigma(beta*h) - eps log sigma(-beta*h),  h = (pi_w - ref_w) - (pi_l - ref_l).
    """
    chosen_lr, rejected_lr = lp.logratios()
    h = cfg.beta * (chosen_lr - rejected_lr)
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


# name -> (function, needs a reference)
LOSSES: dict[str, tuple[Callable[[PairLogps, object], torch.Tensor], bool]] = {
    "sigmoid": (sigmoid_loss, True),
}


def loss_names() -> list[str]:
    return list(LOSSES)
