"""Likelihood metrics on held-out pairs: implicit-reward accuracy and likelihood preference accuracy."""

from __future__ import annotations

from dpokit.core.run import LikelihoodAccuracy, PreferenceMetrics, RankingMetrics, UnpairedMetrics
from dpokit.core.stats import interval, proportion


def preference_metrics(tuned: dict, base: dict, beta: float) -> PreferenceMetrics:
    """Implicit reward r = beta * (log pi_tuned - log pi_base); accuracy = share of pairs with r_chosen > r_rejected.
    Likelihood accuracy: chosen more likely than rejected (summed, and per token) under each model."""
    n = len(tuned["chosen"])
    margins = [beta * ((tuned["chosen"][i] - base["chosen"][i]) - (tuned["rejected"][i] - base["rejected"][i]))
               for i in range(n)]

    def likelihood(lp) -> LikelihoodAccuracy:
        per_tok = [(lp["chosen"][i] / max(lp["chosen_tokens"][i], 1)) > (lp["rejected"][i] / max(lp["rejected_tokens"][i], 1))
                   for i in range(n)]
        return LikelihoodAccuracy(sum=proportion([lp["chosen"][i] > lp["rejected"][i] for i in range(n)]),
                                  mean_per_token=proportion(per_tok))

    return PreferenceMetrics(n_pairs=n, implicit_reward_accuracy=proportion([m > 0 for m in margins]),
                             reward_margin=interval(margins),
                             likelihood_accuracy={"base": likelihood(base), "tuned": likelihood(tuned)})


def ranking_metrics(tuned: list[list[float]], base: list[list[float]], scores: list[list[float]],
                    beta: float) -> RankingMetrics:
    """Ranked held-out lists (responses best first, with their scores): do the implicit rewards
    r = beta * (log pi_tuned - log pi_base) order the responses as the scores do?

    pairwise_accuracy: share of ordered (untied) response pairs whose rewards agree, with a Wilson interval that
    treats the pairs as independent (pairs of one list are not, so it is narrower than it should be);
    kendall_tau: per list, (concordant - discordant) / ordered pairs (a reward tie counts as neither), averaged over
    lists, with a normal interval over lists (independent); best_vs_worst_accuracy: r_best > r_worst."""
    agree, taus, best_worst = [], [], []
    for t, b, s in zip(tuned, base, scores, strict=True):
        r = [beta * (ti - bi) for ti, bi in zip(t, b, strict=True)]
        signs = [(r[i] > r[j]) - (r[i] < r[j]) for i in range(len(r)) for j in range(len(r)) if s[i] > s[j]]
        if not signs:
            continue
        agree += [x > 0 for x in signs]
        taus.append(sum(signs) / len(signs))
        best_worst.append(r[0] > r[-1])
    return RankingMetrics(n_lists=len(taus), n_ordered_pairs=len(agree), pairwise_accuracy=proportion(agree),
                          kendall_tau=interval(taus), best_vs_worst_accuracy=proportion(best_worst))


def unpaired_metrics(tuned: list[float], base: list[float], labels: list[bool], beta: float) -> UnpairedMetrics:
    """Unpaired (KTO) held-out rows: the tuned model should raise desirable answers and lower undesirable ones
    relative to the base, i.e. implicit reward r = beta * (log pi_tuned - log pi_base) > 0 for desirable and < 0
    for undesirable. Accuracy per class (Wilson intervals), their mean (balanced accuracy), mean reward per class."""
    r = [beta * (t - b) for t, b in zip(tuned, base, strict=True)]
    good = [x for x, label in zip(r, labels, strict=True) if label]
    bad = [x for x, label in zip(r, labels, strict=True) if not label]
    desirable, undesirable = proportion([x > 0 for x in good]), proportion([x < 0 for x in bad])
    return UnpairedMetrics(n_desirable=len(good), n_undesirable=len(bad), desirable_accuracy=desirable,
                           undesirable_accuracy=undesirable,
                           balanced_accuracy=(desirable.value + undesirable.value) / 2,
                           reward_desirable=interval(good), reward_undesirable=interval(bad))


def feedback_pairs(encoded: list[dict], values: list[list[float]], counts: list[list[int]]) -> dict[str, list]:
    """Pairs for `preference_metrics` from ranked rows (best vs worst) or unpaired rows (every desirable x
    undesirable completion of the same prompt; none when no prompt has both), as `pair_logps` returns them."""
    out: dict[str, list] = {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": []}

    def add(v_c, n_c, v_r, n_r):
        for key, value in zip(out, (v_c, v_r, n_c, n_r), strict=True):
            out[key].append(value)

    if encoded and "scores" in encoded[0]:
        for v, n in zip(values, counts, strict=True):
            add(v[0], n[0], v[-1], n[-1])
        return out
    by_prompt: dict[tuple, list[int]] = {}
    for i, row in enumerate(encoded):
        by_prompt.setdefault(tuple(row["prompt_ids"]), []).append(i)
    for members in by_prompt.values():
        for i in (m for m in members if encoded[m]["label"]):
            for j in (m for m in members if not encoded[m]["label"]):
                add(values[i][0], counts[i][0], values[j][0], counts[j][0])
    return out
