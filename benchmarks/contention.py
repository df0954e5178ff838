"""Training speed when another process shares the CPUs: tiny train, idle vs busy, per thread setting.

    python benchmarks/contention.py [--out benchmarks/results/contention_cpu.json]

Each cell runs `dpokit train configs/tiny.yaml --no-eval` in a fresh process and reads `train_runtime` (the training
loop, model loading excluded) from train_summary.json. "busy" starts a second process first: a PyTorch matmul loop
with PyTorch's default threads and wait policy, i.e. another ordinary PyTorch job. Settings:

- `libgomp default`: OMP_WAIT_POLICY unset as libgomp sees it (set to "", which libgomp treats as unset after a
  warning), all cores: how dpokit ran before it chose a default;
- `dpokit default`: OMP_WAIT_POLICY=PASSIVE (set by dpokit/__init__.py), all cores;
- `PASSIVE, 1 thread`: plus train.num_threads=1;
- `libgomp default, 1 thread`: OMP_NUM_THREADS=1 without the passive policy.

Prints one JSON object; the slowdown ratios are busy / idle of the same setting, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY = ("import torch, time\n"
        "a = torch.randn(512, 512)\n"
        "t = time.time()\n"
        "while time.time() - t < 900:\n"
        "    a = torch.tanh(a @ a)\n")

SETTINGS = {
    "libgomp default": ({"OMP_WAIT_POLICY": ""}, []),
    "dpokit default (PASSIVE)": ({}, []),
    "PASSIVE, train.num_threads=1": ({}, ["--set", "train.num_threads=1"]),
    "libgomp default, OMP_NUM_THREADS=1": ({"OMP_WAIT_POLICY": "", "OMP_NUM_THREADS": "1"}, []),
}


def train_once(env_extra: dict, args: list[str], workdir: Path, timeout: float) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_extra)
    start = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "dpokit", "train", str(ROOT / "configs" / "tiny.yaml"), "--no-eval",
                              "-q", "--set", f"output.dir={out / 'run'}", "--set", "output.save_model=false", *args],
                             env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"train_runtime_s": None, "wall_s": round(time.time() - start, 2), "note": f"over {timeout:.0f} s"}
    if res.returncode != 0:
        raise SystemExit(f"train failed ({res.returncode}): {res.stderr[-2000:]}")
    summary = json.loads((out / "run" / "train_summary.json").read_text())
    return {"train_runtime_s": round(summary["metrics"]["train_runtime"], 2), "wall_s": round(time.time() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Also write the JSON here.")
    parser.add_argument("--timeout", type=float, default=400.0, help="Seconds per training run before giving up.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_once({}, [], work, args.timeout)  # warm-up: builds the tiny model into the cache
        for name, (env_extra, extra_args) in SETTINGS.items():
            idle = train_once(env_extra, extra_args, work, args.timeout)
            busy_proc = subprocess.Popen([sys.executable, "-c", BUSY], env={k: v for k, v in os.environ.items()
                                                                            if k != "OMP_WAIT_POLICY"})
            try:
                time.sleep(3)  # the loop is running
                busy = train_once(env_extra, extra_args, work, args.timeout)
            finally:
                busy_proc.kill()
                busy_proc.wait()
            ratio = (busy["train_runtime_s"] / idle["train_runtime_s"]
                     if busy["train_runtime_s"] and idle["train_runtime_s"] else None)
            rows.append({"setting": name, "idle": idle, "busy": busy,
                         "slowdown_busy_over_idle": round(ratio, 2) if ratio else None})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"benchmark": "contention", "cpus": os.cpu_count(), "config": "configs/tiny.yaml (72 steps)",
              "busy_load": "second process: torch 512x512 matmul loop, default threads and wait policy",
              "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
