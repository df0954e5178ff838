"""Likelihood metrics on held-out pairs: implicit-reward accuracy and likelihood preference accuracy."""

from __future__ import annotations

from dpokit.core.stats import mean_interval, proportion


def preference_metrics(tuned: dict, base: dict, beta: float) -> dict:
    """Implicit reward r = beta * (log pi_tuned - log pi_base); accuracy = share of pairs with r_chosen > r_rejected.
    Likelihood accuracy: chosen more likely than rejected (summed, and per token) under each model."""
    n = len(tuned["chosen"])
    margins = [beta * ((tuned["chosen"][i] - base["chosen"][i]) - (tuned["rejected"][i] - base["rejected"][i]))
               for i in range(n)]
    mean, low, high = mean_interval(margins)

    def likelihood(lp):
        per_tok = [(lp["chosen"][i] / max(lp["chosen_tokens"][i], 1)) > (lp["rejected"][i] / max(lp["rejected_tokens"][i], 1))
                   for i in range(n)]
        return {"sum": proportion([lp["chosen"][i] > lp["rejected"][i] for i in range(n)]),
                "mean_per_token": proportion(per_tok)}

    return {
        "n_pairs": n,
        "implicit_reward_accuracy": proportion([m > 0 for m in margins]),
        "reward_margin": {"value": mean, "ci": [low, high], "n": n},
        "likelihood_accuracy": {"base": likelihood(base), "tuned": likelihood(tuned)},
    }
