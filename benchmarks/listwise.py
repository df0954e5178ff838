"""Ranked lists vs the same information as pairs (issue 16 must-shows 2 and 3), on the tiny ranked task
(configs/data/tiny_ranked.jsonl: 4 scored answers per prompt).

    OMP_NUM_THREADS=1 python benchmarks/listwise.py                 # throughput + held-out accuracy, prints JSON
    python benchmarks/listwise.py --skip-training                   # throughput only

1. Throughput: one epoch of policy forward + backward (reference log-probs precomputed, as with
   train.reference: precomputed) on the training prompts, as (a) ranked lists: one prefix-shared segment
   [prompt, r1, r2, r3, r4] per prompt, listwise_pl loss; (b) all 6 pairs of each list, each pair prefix-shared
   [prompt, chosen, rejected], sigmoid loss. Same prompts per batch (--batch-prompts). Reports tokens processed
   (non-padding tokens of the packed rows fed to the model) and seconds (median of --rounds).
2. Held-out pairwise accuracy: `dpokit train` of the same samples as ranked lists (listwise_pl) and as
   best-vs-worst pairs (sigmoid, data.kind: pair), same seed, steps and held-out prompts; both scored on the
   held-out ranked lists (pairwise agreement of implicit rewards with the scores, Kendall tau).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this tree's dpokit, installed or not

import torch  # noqa: E402

from dpokit.core.config import DataConfig, TrainConfig, load_config  # noqa: E402
from dpokit.core.models import load_model, load_tokenizer  # noqa: E402
from dpokit.core.packing import collate_lists, list_logps, pack_pairs, packed_sequence_logps  # noqa: E402
from dpokit.core.scoring import feedback_logps  # noqa: E402
from dpokit.data import load_preferences  # noqa: E402
from dpokit.data.encode import encode_rows  # noqa: E402
from dpokit.eval.likelihood import ranking_metrics  # noqa: E402
from dpokit.train.feedback import feedback_inputs  # noqa: E402
from dpokit.train.losses import REGISTRY, PairLogps  # noqa: E402

DATA = ROOT / "configs" / "data" / "tiny_ranked.jsonl"


def all_pairs(row: dict) -> list[dict]:
    r = row["responses_ids"]
    return [{"prompt_ids": row["prompt_ids"], "chosen_ids": r[i], "rejected_ids": r[j],
             "ref_chosen_logps": row["ref_logps"][i], "ref_rejected_logps": row["ref_logps"][j]}
            for i in range(len(r)) for j in range(i + 1, len(r)) if row["scores"][i] > row["scores"][j]]


def epoch(model, batches, step) -> float:
    start = time.perf_counter()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        step(model, batch).backward()
    return time.perf_counter() - start


def throughput(args) -> dict:
    cfg = TrainConfig(beta=0.1)
    tokenizer = load_tokenizer("dpokit-tiny-llama")
    model = load_model("dpokit-tiny-llama", dtype="float32")
    data = load_preferences(DataConfig(source=str(DATA), kind="ranked", eval_fraction=0.0, max_length=64))
    rows, _ = encode_rows(data.train, tokenizer, DataConfig(source=str(DATA), max_length=64))
    ref, _ = feedback_logps(model, rows, tokenizer.pad_token_id, batch_size=16)
    for row, value in zip(rows, ref, strict=True):
        row["ref_logps"] = value
    pad = tokenizer.pad_token_id
    groups = [rows[i:i + args.batch_prompts] for i in range(0, len(rows), args.batch_prompts)]
    list_batches = [collate_lists(g, pad) for g in groups]
    pair_batches = [pack_pairs([p for row in g for p in all_pairs(row)], pad) for g in groups]

    # tokens processed: the real (non-padding) tokens of the packed rows the model reads
    for b, g in zip(list_batches, groups, strict=True):
        b["_n"] = sum(len(r["prompt_ids"]) + sum(map(len, r["responses_ids"])) for r in g)
    for b, g in zip(pair_batches, groups, strict=True):
        b["_n"] = sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                      for row in g for p in all_pairs(row))

    def list_step(m, batch):
        policy, _ = list_logps(m, batch)
        return REGISTRY["listwise_pl"].fn(feedback_inputs(policy, batch["ref_logps"], batch), cfg).mean()

    def pair_step(m, batch):
        out = packed_sequence_logps(m, batch)
        lp = PairLogps(out["chosen"], out["rejected"], batch["ref_chosen_logps"], batch["ref_rejected_logps"])
        return REGISTRY["sigmoid"].fn(lp, cfg).mean()

    model.train()
    epoch(model, list_batches[:2], list_step), epoch(model, pair_batches[:2], pair_step)  # warm-up
    times = {"ranked_lists": [], "pairs": []}
    for _ in range(args.rounds):  # alternate arms so machine load hits both alike
        times["ranked_lists"].append(epoch(model, list_batches, list_step))
        times["pairs"].append(epoch(model, pair_batches, pair_step))
    out = {}
    for name, batches in (("ranked_lists", list_batches), ("pairs", pair_batches)):
        secs = statistics.median(times[name])
        out[name] = {"prompts": len(rows), "items": len(rows) if name == "ranked_lists" else
                     sum(len(all_pairs(r)) for r in rows), "tokens_processed": sum(b["_n"] for b in batches),
                     "padded_tokens_fed": sum(b["input_ids"].numel() for b in batches),
                     "seconds_per_epoch": round(secs, 3), "seconds_all_rounds": [round(t, 3) for t in times[name]]}
    out["pairs_over_lists"] = {"tokens": round(out["pairs"]["tokens_processed"] / out["ranked_lists"]["tokens_processed"], 3),
                               "seconds": round(out["pairs"]["seconds_per_epoch"] / out["ranked_lists"]["seconds_per_epoch"], 3)}
    return out


def held_out_accuracy() -> dict:
    from dpokit.core.models import load_model as load
    from dpokit.core.run import RunDir
    from dpokit.train.trainer import run_training

    base_cfg = ROOT / "configs" / "tiny-ranked.yaml"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"ranked_listwise_pl": ["data.kind=ranked", "train.loss=listwise_pl"],
                "best_vs_worst_pairs": ["data.kind=pair", "train.loss=sigmoid"]}
        for name, sets in runs.items():
            cfg = load_config(str(base_cfg), [*sets, f"output.dir={tmp}/{name}", "eval.enabled=false"])
            results[name] = {"steps": run_training(cfg).final_metrics.get("epoch")}
        # both scored on the held-out ranked lists (same seed and prompts: the split is by prompt)
        eval_rows = RunDir(f"{tmp}/ranked_listwise_pl").read_eval_pairs()
        tokenizer = load_tokenizer("dpokit-tiny-llama")
        encoded, _ = encode_rows(eval_rows, tokenizer, DataConfig(source=str(DATA), max_length=64))
        base = load("dpokit-tiny-llama", dtype="float32")
        base_v, _ = feedback_logps(base, encoded, tokenizer.pad_token_id)
        for name in runs:
            tuned = load(f"{tmp}/{name}/model", dtype="float32")
            tuned_v, _ = feedback_logps(tuned, encoded, tokenizer.pad_token_id)
            results[name] = ranking_metrics(tuned_v, base_v, [r["scores"] for r in encoded],
                                            beta=0.1).model_dump()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {"device": "cpu", "threads": torch.get_num_threads(), "model": "dpokit-tiny-llama",
              "data": str(DATA.relative_to(ROOT)), "throughput": throughput(args)}
    if not args.skip_training:
        report["held_out"] = held_out_accuracy()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
