"""`dpokit plan` vs measured peak memory and step time, side by side, on the CPU configs of issue 17.

For each config the estimate is made in this process (config, tokenizer and data only), then a few real training
steps run in a fresh process (dpokit.train.measure: peak RSS growth over the RSS after imports on CPU,
torch.cuda.max_memory_allocated on a GPU). Prints one JSON object; --out also writes it.

    OMP_NUM_THREADS=1 python benchmarks/plan_accuracy.py --out benchmarks/results/plan_accuracy_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dpokit.core.config import load_config
from dpokit.train.measure import measure
from dpokit.train.resources import plan_resources

ROOT = Path(__file__).resolve().parents[1]
SMOL = ["model.name_or_path=smollm2-135m-instruct", "train.batch_size=4"]
# name -> --set overrides of configs/tiny.yaml (SmolLM2 on the same 240 pairs, 4 pairs a step: short runs)
CONFIGS = {
    "tiny_full": [],
    "smollm2_full_reference_model": SMOL,
    "smollm2_lora_reference_adapter": [*SMOL, "train.lora.r=16", "train.reference=adapter"],
    "smollm2_full_reference_precomputed": [*SMOL, "train.reference=precomputed"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="config names to run (default all)")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for name, overrides in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
        start = time.time()
        est = plan_resources(cfg)
        plan_s = time.time() - start
        got = measure(cfg, steps=args.steps)
        predicted_step = est.seconds_per_epoch / max(est.time["steps_per_epoch"], 1)
        rows.append({
            "config": name, "overrides": overrides, "device": got["device"],
            "predicted_peak_memory_mb": est.peak_memory_mb, "measured_peak_memory_mb": got["peak_memory_mb"],
            "ratio_measured_over_predicted": round(got["peak_memory_mb"] / est.peak_memory_mb, 3),
            "predicted_seconds_per_step": round(predicted_step, 3), "measured_seconds_per_step": got["seconds_per_step"],
            "breakdown_mb": est.breakdown_mb, "plan_seconds": round(plan_s, 1), "baseline_mb": got["baseline_mb"],
            "method": got["method"]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "steps": args.steps, "within_25_percent": all(0.75 <= r["ratio_measured_over_predicted"] <= 1.25
                                                            for r in rows),
              "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
