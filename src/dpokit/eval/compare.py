"""`dpokit compare`: base and tuned answers to one prompt, side by side, with the same seed and decoding."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dpokit.core.judges import build_judge
from dpokit.core.run import RunDir
from dpokit.core.sampling import sample
from dpokit.core.templates import setup_chat_template
from dpokit.eval import _as_base, load_tuned_and_base


def compare_prompt(run_dir: str | Path, prompt: str, *, samples: int | None = None, max_new_tokens: int | None = None,
                   temperature: float | None = None, seed: int | None = None, score: bool = True) -> list[dict]:
    """Generate base and tuned answers to `prompt` with the run's eval decoding (overridable) and, if the run's
    judge is pointwise, score them. A chat-formatted run (conversational held-out prompts) gets the prompt as a
    user message; a plain-text run gets it verbatim."""
    run = RunDir(run_dir)
    run.require_model()
    cfg = run.read_config()
    e = cfg.eval
    rows = run.read_eval_pairs()
    chat = bool(rows) and isinstance(rows[0]["prompt"], list)
    judge = None
    if score:
        judge = build_judge(e.judge, e.judge_options)
        if getattr(judge, "kind", "pointwise") != "pointwise":
            judge = None  # a pairwise judge has no per-answer score to show
    tuned, base, tokenizer = load_tuned_and_base(run, cfg)
    setup_chat_template(tokenizer, cfg.data.chat_template)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tuned.to(device)
    if base is not None:
        base.to(device)
    the_prompt = [{"role": "user", "content": prompt}] if chat else prompt
    n = samples or e.samples_per_prompt
    decoding = dict(num_samples=n, max_new_tokens=max_new_tokens or e.max_new_tokens,
                    temperature=e.temperature if temperature is None else temperature, top_p=e.top_p,
                    seed=e.seed if seed is None else seed, batch_size=e.gen_batch_size,
                    system_prompt=cfg.data.system_prompt, engine=e.engine)
    tuned_s = sample(tuned, tokenizer, [the_prompt], **decoding)[0]
    with _as_base(tuned, base) as base_model:
        base_s = sample(base_model, tokenizer, [the_prompt], **decoding)[0]
    out = [{"sample": k, "base": b.text, "tuned": t.text, "base_score": None, "tuned_score": None}
           for k, (b, t) in enumerate(zip(base_s, tuned_s, strict=False))]
    if judge is not None:
        prompts = [the_prompt] * n
        for row, bs, ts in zip(out, judge.score(prompts, [r["base"] for r in out]),
                               judge.score(prompts, [r["tuned"] for r in out]), strict=False):
            row.update(base_score=bs, tuned_score=ts)
    return out


def print_comparison(prompt: str, rows: list[dict], judge_name: str | None = None) -> None:
    table = Table(title=f"Prompt: {prompt}", show_lines=True, expand=True)
    table.add_column("#", justify="right", width=3)
    table.add_column("base", ratio=1, overflow="fold")
    table.add_column("tuned", ratio=1, overflow="fold")
    for row in rows:
        base, tuned = row["base"] or "(empty)", row["tuned"] or "(empty)"
        if row["base_score"] is not None:
            base += f"\n[dim]{judge_name} score {row['base_score']:.3f}[/dim]"
            tuned += f"\n[dim]{judge_name} score {row['tuned_score']:.3f}[/dim]"
        table.add_row(str(row["sample"]), base, tuned)
    Console().print(table)
