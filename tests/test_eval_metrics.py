"""Each evaluation metric against a hand computation on constructed inputs."""

import math

import pytest

from dpokit.core.scoring import response_logps
from dpokit.core.stats import mean_interval, wilson_interval
from dpokit.eval.likelihood import preference_metrics
from dpokit.eval.metrics import (
    histogram,
    histogram_edges,
    kl_summary,
    length_bucket,
    length_buckets,
    length_summary,
    outcome_summary,
    ratio_interval,
    score_length_regression,
)

Z = 1.959963984540054


def test_wilson_interval_by_hand():
    # 8 of 10: p = 0.8, z^2 = 3.8415; centre = (0.8 + 0.19207)/1.38415; half = z*sqrt(0.016 + 0.0096037)/1.38415
    z2 = Z * Z
    centre = (0.8 + z2 / 20) / (1 + z2 / 10)
    half = Z * math.sqrt(0.8 * 0.2 / 10 + z2 / 400) / (1 + z2 / 10)
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook values
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_mean_interval_by_hand():
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)
    assert mean == 2.5 and (low, high) == pytest.approx((2.5 - Z * sd / 2, 2.5 + Z * sd / 2))


def test_preference_accuracy_by_hand():
    # 3 pairs. Implicit reward margins (beta=0.5): pair1 0.5*((-1+3)-(-5+4)) = 1.5; pair2 0.5*((-4+3)-(-2+2)) = -0.5;
    # pair3 0.5*((-2+2)-(-2+2)) = 0 (a tie is not a correct ranking).
    tuned = {"chosen": [-1.0, -4.0, -2.0], "rejected": [-5.0, -2.0, -2.0], "chosen_tokens": [1, 4, 1],
             "rejected_tokens": [5, 1, 4]}
    base = {"chosen": [-3.0, -3.0, -2.0], "rejected": [-4.0, -2.0, -2.0], "chosen_tokens": [1, 4, 1],
            "rejected_tokens": [5, 1, 4]}
    m = preference_metrics(tuned, base, beta=0.5)
    assert m.implicit_reward_accuracy.value == pytest.approx(1 / 3)
    assert m.implicit_reward_accuracy.ci == pytest.approx(list(wilson_interval(1, 3)))
    assert m.reward_margin.value == pytest.approx((1.5 - 0.5 + 0) / 3)
    # Likelihood accuracy, tuned: sums -1>-5 yes, -4>-2 no, -2>-2 no -> 1/3; per token -1>-1 no, -1>-2 yes,
    # -2>-0.5 no -> 1/3.
    assert m.likelihood_accuracy["tuned"].sum.value == pytest.approx(1 / 3)
    assert m.likelihood_accuracy["tuned"].mean_per_token.value == pytest.approx(1 / 3)
    assert m.likelihood_accuracy["base"].sum.value == pytest.approx(1 / 3)
    for metric in (m.likelihood_accuracy["base"].mean_per_token, m.implicit_reward_accuracy):
        assert len(metric.ci) == 2 and metric.n == 3


def test_win_tie_loss_with_ties_and_unparseable():
    outcomes = [1, 1, 1, 0, 0, -1, None, 1, -1, None]
    s = outcome_summary(outcomes)
    assert (s.n, s.wins, s.ties, s.losses, s.unparseable) == (8, 4, 2, 2, 2)
    assert s.win.value == 0.5 and s.win.ci == pytest.approx(list(wilson_interval(4, 8)))
    assert s.tie.value == 0.25 and s.loss.value == 0.25
    # Win rate with a tie worth half: (4 + 1) / 8; Wilson interval of 5 successes in 8.
    assert s.win_rate.value == pytest.approx(0.625)
    z = 1.959963984540054
    centre = (0.625 + z * z / 16) / (1 + z * z / 8)
    half = z * (0.625 * 0.375 / 8 + z * z / 256) ** 0.5 / (1 + z * z / 8)
    assert s.win_rate.ci == pytest.approx([centre - half, centre + half])
    # All wins still leave an interval with width (a normal interval would collapse to [1, 1]).
    all_wins = outcome_summary([1] * 10).win_rate
    assert all_wins.value == 1.0 and all_wins.ci[0] == pytest.approx(wilson_interval(10, 10)[0])
    assert all_wins.ci[0] < 0.75


def test_length_buckets_by_hand():
    assert length_bucket(10, 9, 0.2) == "length_matched"     # |1| <= 0.2*10
    assert length_bucket(10, 8, 0.2) == "length_matched"     # |2| <= 2: boundary is matched
    assert length_bucket(10, 7, 0.2) == "tuned_longer"
    assert length_bucket(5, 20, 0.2) == "tuned_shorter"
    rows = length_buckets([1, 0, -1, 1, 1, None], [10, 10, 5, 30, 31, 3], [9, 10, 20, 10, 10, 3], 0.2)
    by = {r.bucket: r for r in rows}
    # matched: (10,9)->+1, (10,10)->0, (3,3)->None; longer: (30,10)->+1, (31,10)->+1; shorter: (5,20)->-1.
    assert (by["length_matched"].n, by["length_matched"].wins, by["length_matched"].ties,
            by["length_matched"].unparseable) == (2, 1, 1, 1)
    assert by["length_matched"].win_rate.value == pytest.approx(0.75)
    assert (by["tuned_longer"].n, by["tuned_longer"].wins) == (2, 2)
    assert (by["tuned_shorter"].n, by["tuned_shorter"].losses) == (1, 1)


def test_length_histogram_and_summary():
    edges = histogram_edges([1, 5, 12], bins=4)
    assert edges[0] == 1.0 and edges[-1] > 12
    assert histogram([0, 1, 2, 2, 3], [0.0, 1.0, 2.0, 3.0]) == [1, 1, 3]  # last bin closed on the right
    s = length_summary(base=[2, 4, 6], tuned=[10, 10], bins=5)
    assert s.base.mean.value == 4.0 and s.base.median == 4 and s.tuned.median == 10
    assert sum(s.base.histogram) == 3 and sum(s.tuned.histogram) == 2
    assert s.histogram_edges[0] <= 2 and s.histogram_edges[-1] > 10  # one set of edges covers both models
    assert len(s.base.histogram) == len(s.histogram_edges) - 1


def test_score_length_regression_recovers_known_coefficients():
    # score = 1 + 0.1*length + 0.5*tuned exactly (no noise): OLS recovers it with zero-width intervals.
    len_t, len_b = [10, 20, 30, 5], [12, 7, 25, 40]
    st = [1 + 0.1 * n + 0.5 for n in len_t]
    sb = [1 + 0.1 * n for n in len_b]
    reg = score_length_regression(st, sb, len_t, len_b)
    assert reg.tuned_effect.value == pytest.approx(0.5)
    assert reg.per_token.value == pytest.approx(0.1)
    assert reg.intercept.value == pytest.approx(1.0)
    assert reg.tuned_effect.ci == pytest.approx([0.5, 0.5], abs=1e-6)
    # The raw score gap here is mostly length (tuned answers are shorter): the regression separates the two.
    assert score_length_regression([1.0], [1.0], [3], [3]) is None  # too few answers
    assert score_length_regression([1.0, 2, 3], [1.0, 2, 2], [4, 4, 4], [4, 4, 4]) is None  # no length variation


def test_kl_summary_by_hand():
    # Three samples: log-ratios 2-1=1, -1-(-4)=3, -3-(-3)=0; tokens 2, 3, 1.
    kl = kl_summary([2.0, -1.0, -3.0], [1.0, -4.0, -3.0], [2, 3, 1])
    assert kl.sequence.value == pytest.approx(4 / 3)
    _, low, high = mean_interval([1.0, 3.0, 0.0])
    assert kl.sequence.ci == pytest.approx([low, high])
    assert kl.per_token.value == pytest.approx(4 / 6) and kl.total_tokens == 6
    # Delta-method interval of the ratio estimator, by hand.
    r = 4 / 6
    resid = [1 - r * 2, 3 - r * 3, 0 - r * 1]
    var = sum(e * e for e in resid) / 2 / (3 * 2.0 ** 2)
    assert kl.per_token.ci == pytest.approx([r - Z * math.sqrt(var), r + Z * math.sqrt(var)])
    assert ratio_interval([], []).n == 0


def test_response_logps_and_kl_of_a_model_with_itself(tiny_llama):
    """Real forward: batched right-padded scoring equals one-at-a-time scoring, and KL(model||model) is 0."""
    import torch

    from dpokit.core.batching import token_logps

    model, tok = tiny_llama
    prompts = [tok("<s>Hello there").input_ids, tok("Hi").input_ids]
    responses = [tok(" nice day", add_special_tokens=False).input_ids + [tok.eos_token_id],
                 tok(" a longer answer about the sea", add_special_tokens=False).input_ids]
    sums, counts = response_logps(model, prompts, responses, tok.pad_token_id, batch_size=2)
    assert counts == [len(r) for r in responses]
    with torch.no_grad():
        for p, r, s in zip(prompts, responses, sums, strict=False):
            ids = torch.tensor([p + r])
            lp = token_logps(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0, len(p) - 1:].sum().item()
            assert s == pytest.approx(lp, abs=1e-4)
    kl = kl_summary(sums, sums, counts)
    assert kl.sequence.value == 0.0 and kl.per_token.value == 0.0


def test_sample_is_seeded_and_keeps_ids(tiny_llama):
    from dpokit.core.sampling import generate, sample

    model, tok = tiny_llama
    prompts = ["How was the sea?", [{"role": "user", "content": "Tell me about the park."}]]
    a = sample(model, tok, prompts, num_samples=2, max_new_tokens=6, seed=3, batch_size=3)
    b = generate(model, tok, prompts, num_samples=2, max_new_tokens=6, seed=3, batch_size=3)
    assert [[s.text for s in per] for per in a] == b  # same seed, same answers
    for per in a:
        for s in per:
            assert 1 <= len(s.response_ids) <= 6 and tok.pad_token_id not in s.prompt_ids
            assert tok.eos_token_id not in s.response_ids[:-1]  # trimmed after the first EOS
