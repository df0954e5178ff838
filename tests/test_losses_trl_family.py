"""The losses and options added to match TRL's DPOTrainer (issue 27), each at a point worked out by hand (the
derivation in each test's docstring); TRL parity on a real model is tests/test_trl_parity.py."""

import math
from types import SimpleNamespace

import pytest
import torch

from dpokit.core.packing import log_sum_sq_probs, pair_token_sums
from dpokit.train.losses import REGISTRY, PairLogps, combined_loss, f_divergence_score, parse_loss_spec

LN2 = math.log(2)


def cfg(**kw):
    base = dict(beta=1.0, label_smoothing=0.0, simpo_gamma=0.0, discopop_tau=0.05, f_divergence="reverse_kl",
                f_alpha=None)
    return SimpleNamespace(**{**base, **kw})


def pair(lr_w, lr_l, n_w=1, n_l=1):
    """One pair with the given log-ratios (reference log-probs -10, so pi = ref + log-ratio)."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairLogps(t(-10.0 + lr_w), t(-10.0 + lr_l), t(-10.0), t(-10.0), t(float(n_w)), t(float(n_l)))


def loss(name, lp, c):
    return REGISTRY[name].fn(lp, c).item()


def test_exo_pair_at_zero_margin_and_its_minimum():
    """z = 0: sigma = 1/2 on both sides, so L = 1/2 (log 1/2 - log(1-eps)) + 1/2 (log 1/2 - log eps)
    = -ln 2 - 1/2 ln(eps (1-eps)). The KL is 0 exactly where sigma(z) = 1 - eps, i.e. z = ln((1-eps)/eps)."""
    eps = 0.1
    assert loss("exo_pair", pair(0.0, 0.0), cfg(label_smoothing=eps)) == pytest.approx(
        -LN2 - 0.5 * math.log(eps * (1 - eps)), rel=1e-12)
    assert loss("exo_pair", pair(math.log(9.0), 0.0), cfg(label_smoothing=eps)) == pytest.approx(0.0, abs=1e-12)


def test_nca_and_bco_pair_at_zero_rewards_are_two_ln2():
    """r_w = r_l = 0: every -log sigma(0) is ln 2; NCA has weights 1 + 1/2 + 1/2, BCO 1 + 1: both 2 ln 2.
    r_w = 2, r_l = 0 (beta 1): NCA = ln(1+e^-2) + 1/2 ln(1+e^2) + 1/2 ln 2, BCO = ln(1+e^-2) + ln 2."""
    assert loss("nca_pair", pair(0.0, 0.0), cfg()) == pytest.approx(2 * LN2, rel=1e-12)
    assert loss("bco_pair", pair(0.0, 0.0), cfg()) == pytest.approx(2 * LN2, rel=1e-12)
    assert loss("nca_pair", pair(2.0, 0.0), cfg()) == pytest.approx(
        math.log1p(math.exp(-2)) + 0.5 * math.log1p(math.exp(2)) + 0.5 * LN2, rel=1e-12)
    assert loss("bco_pair", pair(2.0, 0.0), cfg()) == pytest.approx(math.log1p(math.exp(-2)) + LN2, rel=1e-12)


def test_sppo_hard_targets_plus_and_minus_half_over_beta():
    """Targets +1/(2 beta) (winner) and -1/(2 beta) (loser): zero there; at zero log-ratios 2 (1/(2 beta))^2."""
    c = cfg(beta=0.25)  # 1/(2 beta) = 2
    assert loss("sppo_hard", pair(2.0, -2.0), c) == pytest.approx(0.0, abs=1e-12)
    assert loss("sppo_hard", pair(0.0, 0.0), c) == pytest.approx(8.0, rel=1e-12)


def test_apo_zero_and_down_at_the_reference():
    """r = 0: APO-zero = (1 - 1/2) + 1/2 = 1; APO-down = 1/2 + (1 - 1/2) = 1. r_w = r_l = ln 3 (beta 1):
    APO-zero = 1 - 3/4 + 3/4 = 1, APO-down = 3/4 + 1 - 1/2 = 5/4."""
    for name in ("apo_zero", "apo_down"):
        assert loss(name, pair(0.0, 0.0), cfg()) == pytest.approx(1.0, rel=1e-12)
    assert loss("apo_zero", pair(math.log(3), math.log(3)), cfg()) == pytest.approx(1.0, rel=1e-12)
    assert loss("apo_down", pair(math.log(3), math.log(3)), cfg()) == pytest.approx(1.25, rel=1e-12)


def test_discopop_blends_logistic_and_exponential():
    """z = 0: m = sigma(0) = 1/2, L = 1/2 ln 2 + 1/2 e^0 = (ln 2 + 1)/2. z = ln 3 with tau = ln 3: m = sigma(1),
    L = (1 - sigma(1)) ln(1 + 1/3) + sigma(1)/3."""
    assert loss("discopop", pair(0.0, 0.0), cfg()) == pytest.approx((LN2 + 1) / 2, rel=1e-12)
    m = 1 / (1 + math.exp(-1))
    assert loss("discopop", pair(math.log(3), 0.0), cfg(discopop_tau=math.log(3))) == pytest.approx(
        (1 - m) * math.log(4 / 3) + m / 3, rel=1e-12)


def test_sigmoid_norm_divides_each_log_ratio_by_its_length():
    """log-ratios 2 over 4 tokens and -3 over 6: beta * (1/2 + 1/2) = 1, L = -log sigma(1) = ln(1 + e^-1)."""
    assert loss("sigmoid_norm", pair(2.0, -3.0, 4, 6), cfg()) == pytest.approx(math.log1p(math.exp(-1)), rel=1e-12)


def test_aot_matches_sorted_margins_not_pairs():
    """Two pairs, policy margins pi_w - pi_l = (1, -1), reference margins (0, 2). Pairwise the gaps would be
    (1, -3); AOT sorts each side: (-1, 1) - (0, 2) = (-1, -1), so both entries are -log sigma(-1) = ln(1 + e).
    aot_unpaired: log-ratios chosen (1, 0), rejected (3, -1): sorted (0, 1) - (-1, 3) = (1, -2)."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    lp = PairLogps(t(1.0, 0.0), t(0.0, 1.0), t(0.0, 2.0), t(0.0, 0.0))
    assert REGISTRY["aot"].fn(lp, cfg()).tolist() == pytest.approx([math.log1p(math.e)] * 2, rel=1e-12)
    lp = PairLogps(t(1.0, 0.0), t(3.0, -1.0), t(0.0, 0.0), t(0.0, 0.0))
    assert REGISTRY["aot_unpaired"].fn(lp, cfg()).tolist() == pytest.approx(
        [math.log1p(math.exp(-1)), math.log1p(math.exp(2))], rel=1e-12)


def test_f_divergence_scores_at_t_two_and_one_half():
    """t = pi/ref = 2 and 1/2 (u = +-ln 2). forward_kl f'(t) = 1 - 1/t: 1/2 and -1, difference 3/2.
    js_divergence log(2t/(1+t)): log(4/3) and log(2/3), difference ln 2. alpha_divergence (alpha = 1/2)
    (t^(-1/2) - 1)/(-1/2): 2 - sqrt 2 and 2 - 2 sqrt 2, difference sqrt 2. reverse_kl: 2 ln 2."""
    u = torch.tensor([LN2, -LN2], dtype=torch.float64)
    for kind, want in [("reverse_kl", 2 * LN2), ("forward_kl", 1.5), ("js_divergence", LN2),
                       ("alpha_divergence", math.sqrt(2))]:
        s = f_divergence_score(u, cfg(f_divergence=kind, f_alpha=0.5))
        assert (s[0] - s[1]).item() == pytest.approx(want, rel=1e-12), kind
    # sigmoid under js: -log sigma(ln 2) = ln(3/2)
    assert loss("sigmoid", pair(LN2, -LN2), cfg(f_divergence="js_divergence")) == pytest.approx(math.log(1.5))


def test_ld_alpha_weights_the_tokens_past_the_shorter_response():
    """Chosen tokens (-1, -2, -3), rejected (-4, -5): shared length 2, so with alpha 1/2 chosen = -1 - 2 + 1/2 (-3)
    = -4.5 and rejected = -9 (no tail); token counts stay 3 and 2; alpha None sums plainly (-6)."""
    per_token = torch.tensor([-1.0, -4.0, -2.0, -5.0, -3.0])
    slot = torch.tensor([0, 1, 0, 1, 0])  # one pair: chosen slot 0, rejected slot 1
    index = torch.tensor([0, 0, 1, 1, 2])
    out = pair_token_sums(per_token, slot, index, 1, ld_alpha=0.5)
    assert out["chosen"].tolist() == [-4.5] and out["rejected"].tolist() == [-9.0]
    assert out["chosen_tokens"].tolist() == [3.0] and out["rejected_tokens"].tolist() == [2.0]
    assert pair_token_sums(per_token, slot, index, 1)["chosen"].tolist() == [-6.0]


def test_wpo_weight_by_hand():
    """Vocabulary of 2 with logits (0, ln 3): p = (1/4, 3/4), sum p^2 = 10/16. A one-token response with target 1
    has log p - log sum p^2 = ln(3/4 / (10/16)) = ln 1.2, so w = 1.2; a uniform distribution gives w = 1 whatever
    the target. The pair's weight is the product, 1.2."""
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    targets = torch.tensor([1, 0])
    per_token = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    out = pair_token_sums(per_token, torch.tensor([0, 1]), torch.tensor([0, 0]), 1, sum_sq=log_sum_sq_probs(logits))
    assert out["wpo_weights"].tolist() == pytest.approx([1.2], rel=1e-6)


def test_wpo_weights_scale_each_term_and_sft_by_its_batch_mean():
    """TRL multiplies every per-pair loss by the pair's weight; sft's per-pair entries are its batch token mean
    broadcast, so weighted sft is that mean times each weight."""
    lp = pair(1.0, -1.0, 3, 2)
    lp = PairLogps(*(torch.cat([x, x]) for x in (lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected,
                                                 lp.chosen_tokens, lp.rejected_tokens)))
    c = cfg()
    plain = combined_loss(parse_loss_spec("sigmoid:1.0,sft:0.5"), lp, c)
    lp.weights = torch.tensor([0.5, 2.0], dtype=torch.float64)
    weighted = combined_loss(parse_loss_spec("sigmoid:1.0,sft:0.5"), lp, c)
    sig = REGISTRY["sigmoid"].fn(lp, c)
    sft_mean = REGISTRY["sft"].fn(lp, c).mean()
    assert weighted.tolist() == pytest.approx((sig * lp.weights + 0.5 * sft_mean * lp.weights).tolist())
    assert not torch.allclose(weighted, plain)


def test_unknown_loss_says_did_you_mean():
    with pytest.raises(ValueError, match=r"unknown loss 'apo_zeroo'; did you mean 'apo_zero'\?"):
        parse_loss_spec("apo_zeroo")
