"""Peak memory per rank for one model under each strategy: 1 process (the CPU baseline), 2-process DDP and
2-process FSDP2, on this machine's CPU (gloo), through the shipped launcher configs.

    python benchmarks/distributed_memory.py [--model smollm2-135m-instruct] [--steps 3] [--out FILE]

Method: every rank reads its peak resident set size when training ends (VmHWM in /proc/self/status: the most
physical memory the process ever held: Python and torch, the weights as loaded, the frozen reference, gradients,
optimizer state and activations), and the parameter elements it held after preparation; the driver launches the
three runs one after another and prints a table (docs/distributed.md quotes it). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name: launcher prefix (None: plain python, one process), per-process batch (same global batch 8)
    "1 process": (None, 8),
    "2-process DDP": ("ddp.yaml", 4),
    "2-process FSDP2": ("fsdp.yaml", 4),
}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(config: str, out: Path) -> None:
    from transformers import TrainerCallback

    from dpokit.core.config import load_config
    from dpokit.train.trainer import run_training

    class RecordPeak(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
            rank = int(os.environ.get("RANK", "0"))
            (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mb": peak_rss_mb(),
                                                               "parameters_held": held}))

    out.mkdir(parents=True, exist_ok=True)
    run_training(load_config(config), callbacks=[RecordPeak()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], Path(args.worker[1]))

    import yaml

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="dpokit-mem-") as tmp:
        for name, (launcher, batch) in RUNS.items():
            work = Path(tmp) / name.replace(" ", "_")
            cfg = {"model": {"name_or_path": args.model, "dtype": "float32"},
                   "data": {"source": str(ROOT / "configs" / "data" / "tiny_prefs.jsonl"), "eval_fraction": 0.2,
                            "max_length": 64},
                   "train": {"max_steps": args.steps, "batch_size": batch, "logging_steps": 1},
                   "eval": {"enabled": False}, "output": {"dir": str(work / "run")}}
            work.mkdir(parents=True)
            (work / "config.yaml").write_text(yaml.safe_dump(cfg))
            script = [str(Path(__file__).resolve()), "--worker", str(work / "config.yaml"), str(work / "ranks")]
            cmd = [sys.executable, *script] if launcher is None else [
                sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / launcher), "--num_processes", "2", "--main_process_port", "0",
                *script]
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"{name} failed:\n{res.stderr[-3000:]}")
            ranks = sorted((json.loads(p.read_text()) for p in (work / "ranks").glob("rank*.json")),
                           key=lambda r: r["rank"])
            results[name] = ranks
            for r in ranks:
                print(f"{name:16s} rank {r['rank']}: peak RSS {r['peak_rss_mb']:7.0f} MB, "
                      f"parameters held {r['parameters_held']:,}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "steps": args.steps, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
