"""Peak memory of a LoRA DPO run: `reference: precomputed` vs a separate frozen reference model (`reference: model`).

Each variant runs in its own process (a fresh peak); the parent prints one JSON object. On a GPU the number is
torch.cuda.max_memory_allocated; on CPU the process's peak resident set size (ru_maxrss).

    python benchmarks/reference_memory.py                      # SmolLM2-135M-Instruct alias, 4 steps
    python benchmarks/reference_memory.py --model dpokit-tiny-llama --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(mode: str, model: str, steps: int, out: str) -> dict:
    import torch

    from dpokit.core.config import config_from_dict
    from dpokit.train.trainer import run_training

    cfg = config_from_dict({
        "model": {"name_or_path": model, "dtype": "float32"},
        "data": {"source": str(ROOT / "configs" / "data" / "tiny_prefs.jsonl"), "max_length": 64,
                 "max_rows": 64, "eval_fraction": 0.1},
        "train": {"reference": mode, "lora": {"r": 8}, "max_steps": steps, "batch_size": 4, "learning_rate": 1e-4},
        "eval": {"enabled": False},
        "output": {"dir": out, "overwrite": True, "save_model": False},
    })
    run_training(cfg)
    if torch.cuda.is_available():
        return {"mode": mode, "device": "cuda", "peak_bytes": torch.cuda.max_memory_allocated()}
    return {"mode": mode, "device": "cpu", "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", choices=["precomputed", "model"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.model, args.steps, args.out)))
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("precomputed", "model"):
            proc = subprocess.run([sys.executable, __file__, "--one", mode, "--model", args.model, "--steps",
                                   str(args.steps), "--out", str(Path(tmp) / mode)], env=env, capture_output=True,
                                  text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(line[len("RESULT "):])
    pre, sep = results["precomputed"]["peak_bytes"], results["model"]["peak_bytes"]
    print(json.dumps({"model": args.model, "steps": args.steps, "lora_r": 8, "device": results["model"]["device"],
                      "peak_mib": {"precomputed": round(pre / 2**20, 1), "separate_reference_model": round(sep / 2**20, 1)},
                      "saved_mib": round((sep - pre) / 2**20, 1), "precomputed_below_separate": pre < sep}, indent=2))


if __name__ == "__main__":
    main()
