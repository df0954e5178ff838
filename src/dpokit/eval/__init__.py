"""Evaluation of a finished run. Entry point: `evaluate_run(run_dir) -> dict` (also written to eval.json)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dpokit.config import config_from_dict
from dpokit.errors import UserError
from dpokit.utils import atomic_write_text, read_jsonl


def load_run(run_dir: str | Path):
    """The run's resolved config, after checking the folder holds a finished run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a dpokit run folder (no config.yaml); pass the output.dir of a training run")
    if not (run_dir / "model").is_dir():
        raise UserError(f"{run_dir}: no trained model in {run_dir / 'model'}; finish (or --resume) training first")
    raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    return config_from_dict(raw, str(run_dir / "config.yaml"))


def load_tuned_and_base(run_dir: Path, cfg):
    """(tuned, base, tokenizer). With LoRA, `base` is None: the caller disables the adapter instead."""
    from dpokit.models import load_model, load_model_and_tokenizer

    model_dir = run_dir / "model"
    base, tokenizer = load_model_and_tokenizer(cfg.model)
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(model_dir)), None, tokenizer
    tuned = load_model(str(model_dir), dtype=cfg.model.dtype)
    return tuned, base, tokenizer


def evaluate_run(run_dir: str | Path, batch_size: int | None = None, quiet: bool = False) -> dict:
    import torch

    from dpokit.data.templates import encode_rows, setup_chat_template
    from dpokit.eval.likelihood import pair_logps, preference_metrics

    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    eval_path = run_dir / "data" / "eval.jsonl"
    rows = read_jsonl(eval_path) if eval_path.is_file() else []
    if cfg.eval.max_pairs:
        rows = rows[: cfg.eval.max_pairs]
    if not rows:
        raise UserError(f"{run_dir}: no held-out pairs in {eval_path}; set data.eval_fraction > 0 or data.eval_source")
    tuned, base, tokenizer = load_tuned_and_base(run_dir, cfg)
    setup_chat_template(tokenizer, cfg.data.chat_template)
    encoded, _ = encode_rows(rows, tokenizer, cfg.data, origin=str(eval_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tuned.to(device)
    bs = batch_size or cfg.eval.batch_size
    tuned_lp = pair_logps(tuned, encoded, tokenizer.pad_token_id, bs)
    if base is None:
        with tuned.disable_adapter():
            base_lp = pair_logps(tuned, encoded, tokenizer.pad_token_id, bs)
    else:
        base_lp = pair_logps(base.to(device), encoded, tokenizer.pad_token_id, bs)
    result = {"run_dir": str(run_dir), "model": cfg.model.name_or_path, "beta": cfg.train.beta,
              "preference": preference_metrics(tuned_lp, base_lp, cfg.train.beta)}
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    if not quiet:
        print_eval_table(result)
    return result


def _fmt(metric: dict) -> str:
    low, high = metric["ci"]
    return f"{metric['value']:.3f}  [{low:.3f}, {high:.3f}]"


def print_eval_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    pref = result["preference"]
    table = Table(title=f"Held-out preference metrics ({pref['n_pairs']} pairs, 95% CI)")
    table.add_column("metric")
    table.add_column("value [95% CI]", justify="right")
    table.add_row("implicit-reward accuracy (tuned vs base)", _fmt(pref["implicit_reward_accuracy"]))
    table.add_row("mean reward margin", _fmt(pref["reward_margin"]))
    for who in ("base", "tuned"):
        lik = pref["likelihood_accuracy"][who]
        table.add_row(f"likelihood accuracy, {who} (sum)", _fmt(lik["sum"]))
        table.add_row(f"likelihood accuracy, {who} (per token)", _fmt(lik["mean_per_token"]))
    Console().print(table)
