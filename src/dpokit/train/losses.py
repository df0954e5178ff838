"""DPO-family losses: pure functions of sequence log-probabilities.

Each loss takes a `PairLogps` (policy and reference log-probs summed over response tokens, plus token counts) and
the train config (`beta`, `label_smoothing`, `simpo_gamma`), and returns per-pair losses of shape (B,). The trainer
averages them over the batch. Rewards and metrics are computed by the caller.

Notation used in the docstrings, per pair: `pi_w = log pi(y_w|x)` and `pi_l = log pi(y_l|x)` summed over the
response tokens, `ref_w`, `ref_l` the same under the reference, `|y|` the response token count,
`h = (pi_w - ref_w) - (pi_l - ref_l)` the log-ratio margin, `sigma` the logistic function, `eps` the label-noise
rate `train.label_smoothing`.

Losses over other feedback take other inputs, named by each record's `kind`: ranked lists (`ListLogps`: N responses per
prompt, best first) and unpaired rows (`UnpairedLogps`: one completion with a desirable/undesirable label); they
return one loss per prompt (list) or per row (unpaired).

`train.loss` combines losses with weights: `"sigmoid"`, `"sigmoid:1.0,sft:0.5"`, a list `[sigmoid, sft]` (weight 1
each) or a mapping `{sigmoid: 1.0, sft: 0.5}`; `train.sft_weight > 0` adds the `sft` term on top (RPO).
"""

from __future__ import annotations

import difflib
import math
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
    weights: torch.Tensor | None = None  # (B,) WPO pair weights (train.use_weighting), detached; None = 1
    chosen_unweighted: torch.Tensor | None = None  # (B,) `chosen` without LD-DPO's tail weight; None = the same

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def scores(self, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-ratios through the f-divergence's f'(pi/ref) (`train.f_divergence`, f-DPO: Wang et al. 2023,
        "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
        Theorem 1): reverse_kl: log t; forward_kl: 1 - 1/t; js_divergence: log(2t/(1+t)); alpha_divergence:
        (t^(alpha-1) - 1)/(alpha-1), with t = pi/ref per response (u = log t below). TRL's f_divergence_type."""
        return tuple(f_divergence_score(u, cfg) for u in self.logratios())

    def mean_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean log-probs (length-normalised), for SimPO, ORPO and IPO's normalised form."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def f_divergence_score(u: torch.Tensor, cfg) -> torch.Tensor:
    """f'(t) of `train.f_divergence` at t = exp(u), u a log-ratio (see PairLogps.scores); TRL's formulas exactly,
    including its clamp of (alpha-1)*u at 80 (fp32) so exp stays finite, and alpha = 1 as reverse KL (the limit)."""
    kind = getattr(cfg, "f_divergence", "reverse_kl")
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if kind == "alpha_divergence":
        alpha = cfg.f_alpha
        if abs(alpha - 1.0) < 1e-6:
            return u
        wide = torch.promote_types(u.dtype, torch.float32)  # TRL's fp32 for half precision; fp64 stays fp64
        t = torch.clamp(((alpha - 1.0) * u).to(wide), max={torch.float16: 11.0}.get(u.dtype, 80.0))
        return (torch.exp(t) - 1.0).to(u.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f-divergence {kind!r}")


def sigmoid_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7), with cDPO label smoothing
    (Mitchell 2023, "A note on DPO with noisy preferences"):

        L = -(1-eps) log sigma(beta*h) - eps log sigma(-beta*h)

    Derivation: Bradley-Terry with the implicit reward r = beta*log(pi/ref) gives p(y_w > y_l) = sigma(beta*h);
    the negative log-likelihood is -log sigma(beta*h). cDPO assumes each label is flipped with probability eps,
    so the target is the mixture (1-eps, eps) and the loss is the cross-entropy against it.
    Gradient w.r.t. pi_w (eps=0): -beta * sigma(-beta*h) = -beta * sigma(r_l - r_w).
    TRL's "sigmoid" equals this at eps=0 (TRL ignores label_smoothing for sigmoid). With `train.f_divergence`
    the log-ratios in h are replaced by their f-divergence scores (PairLogps.scores), as in f-DPO.
    """
    chosen_lr, rejected_lr = lp.scores(cfg)
    h = cfg.beta * (chosen_lr - rejected_lr)
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def ipo_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """IPO in TRL's length-normalised form (Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences", Eq. 17, with log-ratios averaged per token as TRL does):

        L = ((pi_w - ref_w)/|y_w| - (pi_l - ref_l)/|y_l| - 1/(2*beta))^2

    Derivation: IPO regresses the log-ratio margin onto the constant 1/(2*tau) (tau = beta) instead of pushing it
    to infinity, which is what lets DPO overfit deterministic preferences. TRL divides each log-ratio by its
    response length so beta means the same for short and long answers. `ipo_paper` is the unnormalised form.
    f-divergence scores replace the log-ratios (PairLogps.scores), as TRL does.
    """
    chosen_lr, rejected_lr = lp.scores(cfg)
    n_w, n_l = lp.chosen_tokens.clamp(min=1), lp.rejected_tokens.clamp(min=1)
    return (chosen_lr / n_w - rejected_lr / n_l - 1 / (2 * cfg.beta)) ** 2


def ipo_paper_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """IPO exactly as the paper writes it (Azar et al. 2023, Eq. 17), log-ratios summed over the response:

        L = (h - 1/(2*beta))^2

    Derivation: the empirical IPO objective is the squared error between the margin h and its target 1/(2*tau).
    """
    chosen_lr, rejected_lr = lp.logratios()
    return (chosen_lr - rejected_lr - 1 / (2 * cfg.beta)) ** 2


def hinge_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """SLiC-HF calibration loss (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    Eq. 2) on reference log-ratios, as TRL writes it:

        L = max(0, 1 - beta*h)

    Derivation: SLiC's rank loss max(0, delta - log pi_w + log pi_l) with margin delta = 1/beta, scaled by beta,
    and the log-probs replaced by log-ratios against the reference (which is what TRL's "hinge" computes).
    f-divergence scores replace the log-ratios (PairLogps.scores), as TRL does.
    """
    chosen_lr, rejected_lr = lp.scores(cfg)
    return torch.relu(1 - cfg.beta * (chosen_lr - rejected_lr))


def robust_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    Eq. 8), eps = train.label_smoothing in [0, 0.5):

        L = ((1-eps) * l(h) - eps * l(-h)) / (1 - 2*eps),   l(z) = -log sigma(beta*z)

    Derivation: an unbiased estimate of the clean DPO loss under labels flipped with probability eps: solving
    E[L] = l(h) for the two observed label outcomes gives the de-biased combination above. eps = 0 is DPO.
    f-divergence scores replace the log-ratios (PairLogps.scores), as TRL does.
    """
    chosen_lr, rejected_lr = lp.scores(cfg)
    h = cfg.beta * (chosen_lr - rejected_lr)
    eps = cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def simpo_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6),
    reference-free, gamma = train.simpo_gamma:

        L = -log sigma(beta*pi_w/|y_w| - beta*pi_l/|y_l| - gamma)

    Derivation: the reward is the length-normalised log-likelihood r = beta/|y| * log pi(y|x) (the quantity
    generation ranks by), and Bradley-Terry with a target margin gamma gives the loss above. No reference.
    """
    mean_w, mean_l = lp.mean_logps()
    return -F.logsigmoid(cfg.beta * (mean_w - mean_l) - cfg.simpo_gamma)


def orpo_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eq. 6-7),
    reference-free; lambda = train.beta (as in TRL's ORPOTrainer):

        L = -m_w - lambda * log sigma(log odds(y_w) - log odds(y_l)),
        m = log pi(y|x)/|y| (per-token mean),  log odds(y) = m - log(1 - exp(m))

    Derivation: the SFT term is the per-token NLL of the chosen answer; the odds-ratio term is a Bradley-Terry
    loss on the odds P/(1-P) of each answer with P = exp(m) the geometric-mean token probability.
    """
    mean_w, mean_l = lp.mean_logps()
    log_odds = (mean_w - mean_l) - (torch.log1p(-torch.exp(mean_w)) - torch.log1p(-torch.exp(mean_l)))
    return -mean_w - cfg.beta * F.logsigmoid(log_odds)


def sft_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """NLL of the chosen response (RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 3),
    in TRL's form: the mean over all chosen tokens of the batch,

        L_batch = -(sum_i pi_w,i) / (sum_i |y_w,i|)

    returned as a per-pair tensor whose mean is L_batch (each entry -pi_w,i * B / sum|y_w|), so it composes with
    the other per-pair losses. Reference-free; weight it with `train.sft_weight` or in `train.loss`. With
    `train.ld_alpha` the NLL is of every chosen token at full weight, as TRL's (LD-DPO weights the preference term).
    """
    batch = lp.chosen.shape[0]
    chosen = lp.chosen if lp.chosen_unweighted is None else lp.chosen_unweighted
    return -chosen * batch / lp.chosen_tokens.sum().clamp(min=1)


def exo_pair_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16), K = 2,
    eps = train.label_smoothing (> 0; the paper recommends 1e-3), z = beta*h (h over f-divergence scores):

        L = sigma(z) (log sigma(z) - log(1-eps)) + sigma(-z) (log sigma(-z) - log eps)

    Derivation: EXO minimises the reverse KL(p_theta || p_rh) between the model's distribution over {y_w, y_l},
    p_theta = softmax(beta * log(pi/ref)) = (sigma(z), sigma(-z)), and the smoothed label distribution
    p_rh = (1-eps, eps); writing out the two-term KL gives the loss. Minimum (0) at sigma(z) = 1 - eps.
    """
    chosen_s, rejected_s = lp.scores(cfg)
    z = cfg.beta * (chosen_s - rejected_s)
    eps = torch.as_tensor(cfg.label_smoothing, dtype=z.dtype, device=z.device)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps)))


def nca_pair_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    Eq. 12 with K = 2), r = beta*(pi - ref) per response:

        L = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)

    Derivation: NCA classifies each response against noise from the reference on its own (absolute) reward:
    -log sigma(r_w) pulls the winner's reward up, and the 1/K-weighted -log sigma(-r) terms over all K = 2
    responses keep both bounded; unlike DPO it depends on r_w and r_l separately, so the chosen likelihood cannot
    fall while the margin grows.
    """
    chosen_lr, rejected_lr = lp.logratios()
    r_w, r_l = cfg.beta * chosen_lr, cfg.beta * rejected_lr
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def bco_pair_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", Eq. 4,
    with a zero reward shift), as TRL 1.16 computes it, r = beta*(pi - ref):

        L = -log sigma(r_w) - log sigma(-r_l)

    Derivation: a binary classifier with logit r labels the chosen response 1 and the rejected 0; its two
    cross-entropy terms are the loss. The paper subtracts a reward shift delta (a running mean of the rewards);
    TRL 1.16's DPOTrainer no longer keeps one (delta = 0 on every batch), and dpokit matches that.
    """
    chosen_lr, rejected_lr = lp.logratios()
    return -F.logsigmoid(cfg.beta * chosen_lr) - F.logsigmoid(-cfg.beta * rejected_lr)


def sppo_hard_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """SPPO with hard probabilities (Wu et al. 2024, "Self-Play Preference Optimization for Language Model
    Alignment", Eq. 4.7 with P(y_w > y_l) = 1 and P(y_l > y_w) = 0):

        L = (pi_w - ref_w - 1/(2 beta))^2 + (pi_l - ref_l + 1/(2 beta))^2

    Derivation: SPPO regresses each response's log-ratio onto eta*(P(y > others) - 1/2) with eta = 1/beta; a winner
    (P = 1) gets target +1/(2 beta), a loser (P = 0) -1/(2 beta): two squared errors.
    """
    chosen_lr, rejected_lr = lp.logratios()
    return (chosen_lr - 0.5 / cfg.beta) ** 2 + (rejected_lr + 0.5 / cfg.beta) ** 2


def _smoothed_sigmoid(delta: torch.Tensor, cfg) -> torch.Tensor:
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(cfg.beta * delta) - eps * F.logsigmoid(-cfg.beta * delta)


def aot_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
    Eq. 9), eps = train.label_smoothing:

        d = sort_B(pi_w - pi_l) - sort_B(ref_w - ref_l),  L_k = -(1-eps) log sigma(beta d_k) - eps log sigma(-beta d_k)

    Derivation: AOT asks the policy's distribution of chosen-minus-rejected log-likelihood margins to dominate the
    reference's stochastically (first order); in one dimension the optimal transport plan matches sorted samples,
    so the batch's margins are sorted on both sides and a smoothed logistic loss is put on each quantile's gap.
    A batch-level loss: its value depends on the whole micro-batch (entry k is the k-th quantile, not pair k).
    """
    margins, _ = torch.sort(lp.chosen - lp.rejected, dim=0)
    ref_margins, _ = torch.sort(lp.ref_chosen - lp.ref_rejected, dim=0)
    return _smoothed_sigmoid(margins - ref_margins, cfg)


def aot_unpaired_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024, Eq. 8), eps = train.label_smoothing:

        d = sort_B(pi_w - ref_w) - sort_B(pi_l - ref_l),  L_k = -(1-eps) log sigma(beta d_k) - eps log sigma(-beta d_k)

    Derivation: the chosen log-ratios' distribution should dominate the rejected ones' (first-order stochastic
    dominance); matching sorted samples (the 1-D optimal transport plan) pairs the k-th smallest of each, whatever
    pair they came from. A batch-level loss, as `aot`.
    """
    chosen_lr, rejected_lr = lp.logratios()
    return _smoothed_sigmoid(torch.sort(chosen_lr, dim=0)[0] - torch.sort(rejected_lr, dim=0)[0], cfg)


def apo_zero_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Eq. 7),
    r = beta*(pi - ref):

        L = (1 - sigma(r_w)) + sigma(r_l)

    Derivation: anchored at the reference (reward 0): the chosen reward is pushed up and the rejected one down,
    each on its own, for data whose chosen answers are better than the model's own outputs.
    """
    chosen_lr, rejected_lr = lp.logratios()
    return 1 - torch.sigmoid(cfg.beta * chosen_lr) + torch.sigmoid(cfg.beta * rejected_lr)


def apo_down_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), r = beta*(pi - ref):

        L = sigma(r_w) + (1 - sigma(r_w - r_l))

    Derivation: for data whose chosen answers are worse than the model's outputs: the chosen likelihood is pushed
    down (first term) while the rejected one goes down further (the margin term keeps r_w - r_l growing).
    """
    chosen_lr, rejected_lr = lp.logratios()
    return torch.sigmoid(cfg.beta * chosen_lr) + 1 - torch.sigmoid(cfg.beta * (chosen_lr - rejected_lr))


def discopop_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", Eq. 5), z = beta*h, tau = train.discopop_tau:

        m = sigma(z / tau),   L = (1 - m) * (-log sigma(z)) + m * exp(-z)

    Derivation: an LLM-discovered blend of the logistic (DPO) loss and the exponential loss exp(-z), mixed by a
    sigmoid of the margin itself: small margins are trained logistically, large ones exponentially (whose gradient
    vanishes faster). f-divergence scores replace the log-ratios in h, as TRL does.
    """
    chosen_s, rejected_s = lp.scores(cfg)
    z = cfg.beta * (chosen_s - rejected_s)
    m = torch.sigmoid(z / cfg.discopop_tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m


def sigmoid_norm_loss(lp: PairLogps, cfg) -> torch.Tensor:
    """Length-normalised DPO (TRL's "sigmoid_norm"; the normalisation of SimPO, Meng et al. 2024, applied to DPO's
    reference log-ratios, as in the length-normalised DPO of Lambert et al. 2024, "Tulu 3", Eq. 6):

        L = -log sigma(beta * ((pi_w - ref_w)/|y_w| - (pi_l - ref_l)/|y_l|))

    Derivation: DPO's Bradley-Terry loss with each implicit reward divided by its response length, so a long
    answer does not win (or lose) by token count alone. f-divergence scores replace the log-ratios.
    """
    chosen_s, rejected_s = lp.scores(cfg)
    n_w, n_l = lp.chosen_tokens.clamp(min=1), lp.rejected_tokens.clamp(min=1)
    return -F.logsigmoid(cfg.beta * (chosen_s / n_w - rejected_s / n_l))


# --- Feedback beyond one pair: ranked lists and unpaired (KTO) rows ---------------------------------------------

@dataclass
class ListLogps:
    """N responses per prompt, best first (sorted by score, highest first; ties keep the given order).
    Rows with fewer responses than the widest are padded; `mask` says which entries are real."""

    policy: torch.Tensor  # (B, N) sum of log pi(y_k | x) over response tokens
    mask: torch.Tensor  # (B, N) bool, True = a real response
    scores: torch.Tensor  # (B, N) the given scores (higher is better), descending along N
    ref: torch.Tensor | None = None  # (B, N) same under the reference

    def rewards(self, beta: float) -> torch.Tensor:
        return beta * (self.policy - self.ref)


@dataclass
class UnpairedLogps:
    """One completion per prompt with a thumbs-up/down `label`, and for the KTO reference point the log-probs of a
    mismatched completion (another row's answer) under the same prompt (`kl_*`)."""

    policy: torch.Tensor  # (B,) log pi(y | x)
    label: torch.Tensor  # (B,) bool, True = desirable
    ref: torch.Tensor | None = None
    kl_policy: torch.Tensor | None = None  # (B,) log pi(y' | x) for a mismatched completion y'
    kl_ref: torch.Tensor | None = None


def listwise_pl_loss(lp: ListLogps, cfg) -> torch.Tensor:
    """Plackett-Luce DPO (Rafailov et al. 2023, "Direct Preference Optimization", Appendix A.3, Eq. 18): for a
    ranking tau_1 > ... > tau_N of N responses with implicit rewards r = beta * (log pi - log ref),

        L = -log prod_k exp(r_tau_k) / sum_{j>=k} exp(r_tau_j) = -sum_k [r_tau_k - logsumexp_{j>=k} r_tau_j]

    Derivation: the Plackett-Luce model picks the best of the remaining responses with softmax probabilities, one
    position at a time; with the DPO reward parametrisation its negative log-likelihood is the above. With N = 2
    it is -log sigma(r_1 - r_2), DPO's sigmoid loss. Ties are ranked in the given order.
    """
    # Padding gets the most negative finite value (exp of it is 0; -inf would give NaN gradients through where)
    r = lp.rewards(cfg.beta)
    r = r.masked_fill(~lp.mask, torch.finfo(r.dtype).min)
    # logsumexp over j >= k: a cumulative logsumexp from the end
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    terms = torch.where(lp.mask, r - tail, torch.zeros_like(r))
    return -terms.sum(-1)


def listwise_pairs_loss(lp: ListLogps, cfg) -> torch.Tensor:
    """Every pair of a ranking as a DPO pair (the pairwise reduction of Plackett-Luce; Rafailov et al. 2023,
    Eq. 7 summed over pairs, as in LiPO's "DPO-BT" baseline, Liu et al. 2024):

        L = sum_{i<j, s_i > s_j} -log sigma(r_i - r_j)

    Derivation: Bradley-Terry on each ordered pair of the list, summed; tied scores give no pair. With N = 2 it
    is DPO's sigmoid loss.
    """
    r = lp.rewards(cfg.beta)
    diff = r.unsqueeze(-1) - r.unsqueeze(-2)  # (B, N, N): r_i - r_j
    valid = lp.mask.unsqueeze(-1) & lp.mask.unsqueeze(-2) & (lp.scores.unsqueeze(-1) > lp.scores.unsqueeze(-2))
    return torch.where(valid, -F.logsigmoid(diff), torch.zeros_like(diff)).sum((-1, -2))


def kto_loss(lp: UnpairedLogps, cfg) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7-8), as TRL's
    KTOTrainer computes it, with r = log pi(y|x) - log ref(y|x):

        z0 = max(0, mean_batch[log pi(y'|x) - log ref(y'|x)])   (detached; y' = another row's completion)
        L = lambda_D * (1 - sigma(beta*(r - z0)))   for a desirable y,
            lambda_U * (1 - sigma(beta*(z0 - r)))   for an undesirable y

    Derivation: prospect theory's value of a gain (loss) relative to the reference point z0, an estimate of
    KL(pi || ref) from mismatched prompt/completion pairs of the batch; it is clamped at 0 (a KL is non-negative)
    and not back-propagated through. lambda_D = train.desirable_weight, lambda_U = train.undesirable_weight.
    """
    z0 = (lp.kl_policy - lp.kl_ref).mean().clamp(min=0).detach()
    r = lp.policy - lp.ref
    desirable = cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (r - z0)))
    undesirable = cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (z0 - r)))
    return torch.where(lp.label, desirable, undesirable)


@dataclass(frozen=True)
class Loss:
    """One registered loss. Config validation (`parse_loss_spec`), `dpokit losses`, the README's loss table
    (tests/test_docs.py) and the TRL engine's mapping are all derived from these records, so they cannot drift.
    Formula notation: the module docstring; for lists, r_k = beta (pi_k - ref_k) with responses best first; for
    unpaired rows, r = pi - ref and z0 the batch KL reference point."""

    name: str
    fn: Callable[..., torch.Tensor]  # (logps of its data kind, train config) -> per-row loss
    needs_reference: bool
    formula: str
    paper: str
    kind: str = "pair"  # the rows it trains on (`data.kind`): pair | ranked | unpaired
    trl_name: str | None = None  # TRL DPOTrainer's loss_type with the same formula (train.engine: trl)
    trl_note: str = ""  # the table's "also in TRL" when more than yes/no ("no (ORPOTrainer)")
    f_divergence: bool = False  # takes train.f_divergence (its log-ratios go through PairLogps.scores)
    batch_level: bool = False  # entries are batch quantiles, not pairs (aot): no per-pair WPO weight

    @property
    def in_trl(self) -> str:
        return self.trl_note or ("yes" if self.trl_name else "no")


REGISTRY: dict[str, Loss] = {loss.name: loss for loss in (
    Loss("sigmoid", sigmoid_loss, True, "-(1-eps) log s(beta h) - eps log s(-beta h)  (eps > 0 = cDPO)",
         "Rafailov et al. 2023; Mitchell 2023 (cDPO)", trl_name="sigmoid", f_divergence=True, trl_note="yes (eps = 0 only)"),
    Loss("ipo", ipo_loss, True, "((pi_w-ref_w)/|y_w| - (pi_l-ref_l)/|y_l| - 1/(2 beta))^2  (TRL's length-normalised "
         "form)", "Azar et al. 2023", trl_name="ipo", f_divergence=True),
    Loss("ipo_paper", ipo_paper_loss, True, "(h - 1/(2 beta))^2  (the paper's Eq. 17, summed log-ratios)",
         "Azar et al. 2023"),
    Loss("hinge", hinge_loss, True, "max(0, 1 - beta h)", "Zhao et al. 2023 (SLiC-HF)", trl_name="hinge", f_divergence=True),
    Loss("robust", robust_loss, True, "((1-eps) l(h) - eps l(-h)) / (1-2 eps),  l(z) = -log s(beta z)",
         "Chowdhury et al. 2024 (rDPO)", trl_name="robust", f_divergence=True),
    Loss("simpo", simpo_loss, False, "-log s(beta m_w - beta m_l - gamma),  gamma = train.simpo_gamma",
         "Meng et al. 2024"),
    Loss("orpo", orpo_loss, False, "-m_w - beta log s(log odds_w - log odds_l),  log odds = m - log(1 - e^m)",
         "Hong et al. 2024", trl_note="no (ORPOTrainer)"),
    Loss("sft", sft_loss, False, "-sum pi_w / sum |y_w| over the batch (chosen NLL per token)",
         "Pang et al. 2024 (RPO)", trl_name="sft", f_divergence=True),
    Loss("exo_pair", exo_pair_loss, True, "s(z) (log s(z) - log(1-eps)) + s(-z) (log s(-z) - log eps),  z = beta h, "
         "eps = label_smoothing > 0", "Ji et al. 2024 (EXO)", trl_name="exo_pair", f_divergence=True),
    Loss("nca_pair", nca_pair_loss, True, "-log s(r_w) - 0.5 log s(-r_w) - 0.5 log s(-r_l),  r = beta (pi - ref)",
         "Chen et al. 2024 (NCA)", trl_name="nca_pair"),
    Loss("bco_pair", bco_pair_loss, True, "-log s(r_w) - log s(-r_l),  r = beta (pi - ref)  (reward shift 0, as TRL "
         "1.16)", "Jung et al. 2024 (BCO)", trl_name="bco_pair"),
    Loss("sppo_hard", sppo_hard_loss, True, "(pi_w - ref_w - 1/(2 beta))^2 + (pi_l - ref_l + 1/(2 beta))^2",
         "Wu et al. 2024 (SPPO, hard labels)", trl_name="sppo_hard"),
    Loss("aot", aot_loss, True, "-(1-eps) log s(beta d) - eps log s(-beta d),  d = sort(pi_w - pi_l) - sort(ref_w - "
         "ref_l) over the batch", "Melnyk et al. 2024 (AOT)", trl_name="aot", batch_level=True),
    Loss("aot_unpaired", aot_unpaired_loss, True, "-(1-eps) log s(beta d) - eps log s(-beta d),  d = sort(pi_w - "
         "ref_w) - sort(pi_l - ref_l) over the batch", "Melnyk et al. 2024 (AOT)", trl_name="aot_unpaired", batch_level=True),
    Loss("apo_zero", apo_zero_loss, True, "1 - s(r_w) + s(r_l),  r = beta (pi - ref)", "D'Oosterlinck et al. 2024 "
         "(APO)", trl_name="apo_zero"),
    Loss("apo_down", apo_down_loss, True, "s(r_w) + 1 - s(r_w - r_l),  r = beta (pi - ref)", "D'Oosterlinck et al. "
         "2024 (APO)", trl_name="apo_down"),
    Loss("discopop", discopop_loss, True, "(1 - m) (-log s(z)) + m e^{-z},  z = beta h, m = s(z / tau), tau = "
         "train.discopop_tau", "Lu et al. 2024 (DiscoPOP)", trl_name="discopop", f_divergence=True),
    Loss("sigmoid_norm", sigmoid_norm_loss, True, "-log s(beta ((pi_w-ref_w)/|y_w| - (pi_l-ref_l)/|y_l|))",
         "Meng et al. 2024; Lambert et al. 2024 (length-normalised DPO)", trl_name="sigmoid_norm", f_divergence=True),
    Loss("listwise_pl", listwise_pl_loss, True, "-sum_k log( e^{r_k} / sum_{j>=k} e^{r_j} )  (Plackett-Luce over "
         "the ranking)", "Rafailov et al. 2023, appendix A.3", kind="ranked"),
    Loss("listwise_pairs", listwise_pairs_loss, True, "sum_{i<j} -log s(r_i - r_j)  (DPO over every ordered pair "
         "of the list)", "Rafailov et al. 2023 (pairwise expansion)", kind="ranked"),
    Loss("kto", kto_loss, True, "w_D (1 - s(beta (r - z0))) if desirable, w_U (1 - s(beta (z0 - r))) if not",
         "Ethayarajh et al. 2024", kind="unpaired", trl_note="yes (KTOTrainer)"),
)}


def loss_kind(name: str) -> str:
    return REGISTRY[name].kind


def loss_table() -> list[dict[str, str]]:
    """One row per registered loss, for `dpokit losses` and the README."""
    return [{"loss": r.name, "data": r.kind, "formula": r.formula, "paper": r.paper,
             "reference": "yes" if r.needs_reference else "no", "trl": r.in_trl} for r in REGISTRY.values()]


def loss_table_markdown() -> str:
    rows = ["| loss | data | formula | paper | needs reference | also in TRL |", "|---|---|---|---|---|---|"]
    for r in loss_table():
        formula = r["formula"].replace("|", "\\|")
        rows.append(f"| `{r['loss']}` | {r['data']} | `{formula}` | {r['paper']} | {r['reference']} | {r['trl']} |")
    return "\n".join(rows)


def trl_loss_names() -> dict[str, str]:
    """Our name -> TRL DPOTrainer's loss_type, for the losses both implement with the same formula."""
    return {r.name: r.trl_name for r in REGISTRY.values() if r.trl_name}


def loss_names(kind: str | None = None) -> list[str]:
    return [name for name in REGISTRY if kind is None or loss_kind(name) == kind]


def terms_kind(terms: list[tuple[str, float]]) -> str:
    """The data kind a parsed loss spec trains on (parse_loss_spec has checked the terms agree)."""
    return loss_kind(terms[0][0])


def parse_loss_spec(spec, sft_weight: float = 0.0) -> list[tuple[str, float]]:
    """`train.loss` (+ `train.sft_weight`) -> [(name, weight), ...]. Raises ValueError naming the fix."""
    if isinstance(spec, str):
        terms = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, weight = part.partition(":")
            terms.append((name.strip(), weight.strip() if sep else 1.0))
    elif isinstance(spec, list):
        terms = [(str(name), 1.0) for name in spec]
    elif isinstance(spec, dict):
        terms = [(str(name), weight) for name, weight in spec.items()]
    else:
        raise ValueError("expected a name, 'name:weight,...', a list or a mapping")
    out = []
    for name, weight in terms:
        if name not in REGISTRY:
            close = difflib.get_close_matches(name, REGISTRY, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown loss {name!r}; {hint}choose from {', '.join(REGISTRY)} (combine as "
                             "'sigmoid:1.0,sft:0.5')")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"weight of {name!r} must be a number, got {weight!r}") from None
        if not weight > 0:
            raise ValueError(f"weight of {name!r} must be > 0, got {weight}")
        out.append((name, weight))
    if not out:
        raise ValueError("no loss given; e.g. sigmoid")
    if len({n for n, _ in out}) != len(out):
        raise ValueError("a loss is listed twice; give each once with its weight")
    if sft_weight > 0:
        if any(n == "sft" for n, _ in out):
            raise ValueError("sft is both in train.loss and train.sft_weight; use one")
        out.append(("sft", float(sft_weight)))
    kinds = {n: loss_kind(n) for n, _ in out}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"cannot combine losses over different data kinds ({', '.join(f'{n}: {k}' for n, k in kinds.items())}); "
                         "use losses of one kind (pair, ranked or unpaired)")
    return out


def option_problems(terms: list[tuple[str, float]], cfg) -> list[str]:
    """The train options (f-divergence, WPO, label smoothing) the chosen losses cannot take, each with its fix."""
    problems = []
    if cfg.f_divergence != "reverse_kl":
        other = [n for n, _ in terms if not REGISTRY[n].f_divergence]
        if other:
            takes = ", ".join(n for n, r in REGISTRY.items() if r.f_divergence)
            problems.append(f"train.f_divergence: {cfg.f_divergence} does not apply to loss {', '.join(other)} (its "
                            f"f-DPO form needs the chosen-minus-rejected reward difference); use f_divergence: "
                            f"reverse_kl, or one of {takes}")
    if cfg.use_weighting and any(REGISTRY[n].batch_level for n, _ in terms):
        problems.append("train.use_weighting: WPO weights are per pair, but aot / aot_unpaired sort the batch "
                        "(their entries are quantiles, not pairs); use_weighting: false, or another loss")
    if any(n == "exo_pair" for n, _ in terms) and not cfg.label_smoothing > 0:
        problems.append("train.label_smoothing: exo_pair needs label_smoothing > 0 (log eps of its target "
                        "distribution); set it, e.g. 0.001 as the EXO paper recommends")
    return problems


def needs_reference(terms: list[tuple[str, float]]) -> bool:
    return any(REGISTRY[name].needs_reference for name, _ in terms)


def combined_loss(terms: list[tuple[str, float]], lp: PairLogps | ListLogps | UnpairedLogps, cfg) -> torch.Tensor:
    """Per-row sum of weighted losses (each times the pair's WPO weight when `lp.weights` is set, as TRL does; only
    pairs carry WPO weights, list and unpaired rows have none)."""
    pair_weights = getattr(lp, "weights", None)
    total = None
    for name, weight in terms:
        value = REGISTRY[name].fn(lp, cfg)
        if pair_weights is not None:  # WPO: every term scaled per pair; sft's batch token-mean by each pair's weight
            value = (value.mean().expand_as(value) if name == "sft" else value) * pair_weights
        value = weight * value
        total = value if total is None else total + value
    return total
