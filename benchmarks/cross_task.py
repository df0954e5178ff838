"""One shipped default, several tasks: `dpokit quickstart` as shipped on the bundled sentiment task and on two tasks
of our own, each changing only the prompts, the judge and the answer length (issue 26). Prints one JSON row per
(task, variant) and writes them to --out.

    python benchmarks/cross_task.py                                  # the three tasks, the shipped config
    python benchmarks/cross_task.py --tasks concise --variant hot=train.learning_rate=1e-2 \
        --variant hot-best=train.learning_rate=1e-2,train.select=best_judge

The tasks (benchmarks/tasks/):
- `sentiment`: the bundled task (warm answers, VADER), as shipped.
- `concise`: 184 "Explain X in simple terms." prompts, 40-token answers, `concise_judge.py` (a finished, plain
  answer of about 20 words; shorter loses as surely as longer, so over-optimising toward short answers is caught).
- `advice`: 180 "How can I X?" prompts, 32-token answers, `plain_judge.py` (short common words, no repetition,
  at least 12 words).

Each run reuses the quickstart's pair cache (keyed by model, prompts and sampling settings), so variants of one
task sample their pairs once. A variant's overrides are comma-separated `key=value` pairs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TASKS = {
    "sentiment": {},
    "concise": {"prompts": "explain_prompts.txt", "judge": "concise_judge.py:score", "max_new_tokens": 40,
                "num_prompts": 184, "eval_prompts": 84},
    "advice": {"prompts": "advice_prompts.txt", "judge": "plain_judge.py:score", "max_new_tokens": 32,
               "num_prompts": 180, "eval_prompts": 80},
}


def task_overrides(name: str) -> list[str]:
    """The quickstart's --set flags for a task: prompts, judge and answer length only."""
    t = TASKS[name]
    if not t:
        return []
    # Relative to the repository root (the runs' working directory), so the pair cache's key is machine-independent.
    judge = f"benchmarks/tasks/{t['judge']}"
    sets = {"pairs.prompts": f"benchmarks/tasks/{t['prompts']}", "pairs.num_prompts": t["num_prompts"],
            "pairs.eval_prompts": t["eval_prompts"], "eval.num_prompts": t["eval_prompts"],
            "pairs.judge": "python", "pairs.judge_options.function": judge,
            "eval.judge": "python", "eval.judge_options.function": judge,
            "pairs.max_new_tokens": t["max_new_tokens"], "eval.max_new_tokens": t["max_new_tokens"]}
    return [f"{k}={v}" for k, v in sets.items()]


def run(task: str, variant: str, overrides: list[str], out_root: Path) -> dict:
    out = out_root / f"{task}-{variant}"
    cmd = [sys.executable, "-m", "dpokit", "quickstart", "--out", str(out)]
    for item in task_overrides(task) + overrides:
        cmd += ["--set", item]
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"task": task, "variant": variant, "error": done.stderr.strip().splitlines()[-1:]}
    s = json.loads((out / "summary.json").read_text())
    selection = out / "run" / "selection.json"
    kept = json.loads(selection.read_text()).get("kept_step") if selection.is_file() else None
    keys = ("outcome", "win_rate", "win_rate_ci", "wins", "ties", "losses", "n_eval_prompts", "mean_score_base",
            "mean_score_tuned", "score_change", "score_change_ci", "implicit_reward_accuracy", "kl",
            "mean_length_base", "mean_length_tuned", "train_steps", "stage_seconds")
    return {"task": task, "variant": variant, "overrides": overrides, **{k: s.get(k) for k in keys},
            "kept_step": kept, "verdict_first_line": s["verdict"].split(". Also look at")[0],
            "wall_seconds": round(time.time() - start, 1)}


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="sentiment,concise,advice")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=key=value[,key=value...]; default: one variant 'shipped' with no overrides")
    ap.add_argument("--out-root", default="runs/cross_task")
    ap.add_argument("--out", default="benchmarks/results/cross_task_cpu_smollm2.json")
    args = ap.parse_args()
    variants = {"shipped": []}
    if args.variant:
        variants = {}
        for v in args.variant:
            name, _, sets = v.partition("=")
            variants[name] = [s for s in sets.split(",") if s]
    rows = []
    for task in args.tasks.split(","):
        for name, overrides in variants.items():
            row = run(task, name, overrides, ROOT / args.out_root)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"cpu": cpu_model(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
