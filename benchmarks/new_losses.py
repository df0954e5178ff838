"""What each of TRL's losses added in issue 27 does on the same data and budget (issue 27 must-show 3).

    OMP_NUM_THREADS=1 python benchmarks/new_losses.py            # prints JSON and the markdown table

One `dpokit train` per loss of configs/tiny.yaml (tiny LLaMA built locally, configs/data/tiny_prefs.jsonl: warm
vs cold answers, 20% of prompts held out, 3 epochs, batch 8, lr 1e-3, beta 0.1, seed 42; eval off), then on the
held-out pairs: implicit-reward accuracy (share of pairs with beta * (log-ratio chosen - log-ratio rejected) > 0,
log-ratios against the untrained model, the reference) and the mean of that margin (`preference_metrics`, as
`dpokit eval` reports them). sigmoid (DPO) is the baseline row. exo_pair, aot and aot_unpaired run with
label_smoothing 0.1 (exo_pair needs eps > 0); the rest with 0.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this tree's dpokit, installed or not

from dpokit.core.config import load_config  # noqa: E402
from dpokit.core.models import load_model, load_tokenizer  # noqa: E402
from dpokit.core.run import RunDir  # noqa: E402
from dpokit.core.scoring import pair_logps  # noqa: E402
from dpokit.data.encode import encode_rows  # noqa: E402
from dpokit.eval.likelihood import preference_metrics  # noqa: E402
from dpokit.train.trainer import run_training  # noqa: E402

CONFIG = ROOT / "configs" / "tiny.yaml"
LOSSES = {"sigmoid": 0.0, "exo_pair": 0.1, "nca_pair": 0.0, "bco_pair": 0.0, "sppo_hard": 0.0, "aot": 0.1,
          "aot_unpaired": 0.1, "apo_zero": 0.0, "apo_down": 0.0, "discopop": 0.0, "sigmoid_norm": 0.0}


def main():
    results = {}
    tokenizer = load_tokenizer("dpokit-tiny-llama")
    base = load_model("dpokit-tiny-llama", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        base_lp = encoded = None
        for loss, eps in LOSSES.items():
            cfg = load_config(str(CONFIG), [f"train.loss={loss}", f"train.label_smoothing={eps}",
                                            f"output.dir={tmp}/{loss}", "eval.enabled=false"])
            final = run_training(cfg).final_metrics
            if encoded is None:  # the same held-out pairs for every run (the split is seeded)
                encoded, _ = encode_rows(RunDir(f"{tmp}/{loss}").read_eval_pairs(), tokenizer, cfg.data)
                base_lp = pair_logps(base, encoded, tokenizer.pad_token_id)
            tuned = load_model(f"{tmp}/{loss}/model", dtype="float32")
            m = preference_metrics(pair_logps(tuned, encoded, tokenizer.pad_token_id), base_lp, beta=cfg.train.beta).model_dump()
            results[loss] = {"label_smoothing": eps, "train_loss": round(final.get("train_loss", float("nan")), 4),
                             "held_out_pairs": m["n_pairs"],
                             "implicit_reward_accuracy": m["implicit_reward_accuracy"],
                             "reward_margin": m["reward_margin"]}
    print(json.dumps(results, indent=2))
    print("\n| loss | held-out implicit-reward accuracy | mean held-out margin (95% CI) |\n|---|---|---|")
    for loss, r in results.items():
        acc, mar = r["implicit_reward_accuracy"], r["reward_margin"]
        acc_v = acc["value"] if isinstance(acc, dict) else acc
        print(f"| {loss} | {acc_v:.3f} | {mar['value']:.3f} [{mar['ci'][0]:.3f}, {mar['ci'][1]:.3f}] |")


if __name__ == "__main__":
    main()
