"""Evaluation of a finished run. Entry point: `evaluate_run(run_dir) -> EvalResult` (also written to eval.json).
A vision-language run (held-out rows with images) goes through `dpokit.eval.vision`."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from rich.table import Table

from dpokit.core.config import EvalConfig, RunConfig, apply_overrides, config_from_dict, parse_override
from dpokit.core.errors import UserError
from dpokit.core.judges import build_judge
from dpokit.core.judges import (
    compare as judge_pairs,  # the submodule dpokit.eval.compare would replace `compare`
)
from dpokit.core.models import load_model, load_model_and_tokenizer
from dpokit.core.run import EvalResult, EvalSample, RunDir
from dpokit.core.sampling import sample
from dpokit.core.scoring import feedback_logps, pair_logps, pairs_fingerprint, response_logps
from dpokit.core.stats import interval
from dpokit.core.templates import setup_chat_template
from dpokit.data import distinct_prompts
from dpokit.data.encode import encode_rows
from dpokit.eval.likelihood import feedback_pairs, preference_metrics, ranking_metrics, unpaired_metrics
from dpokit.eval.metrics import (
    kl_summary,
    length_buckets,
    length_controlled_win_rate,
    length_summary,
    outcome_summary,
    score_length_regression,
)
from dpokit.eval.vision import (
    check_vision_judge,
    distinct_vision_prompts,
    encode_eval_pairs,
    is_vision_eval,
    load_vision_models,
    read_eval_images,
    vision_generation_metrics,
)


def load_run(run_dir: str | Path) -> RunConfig:
    """The run's resolved config, after checking the folder holds a finished run."""
    run = RunDir(run_dir)
    run.require_model()
    return run.read_config()


def load_tuned_and_base(run: RunDir, cfg: RunConfig):
    """(tuned, base, tokenizer). With LoRA, `base` is None: the caller disables the adapter instead."""
    base, tokenizer = load_model_and_tokenizer(cfg.model, precision=cfg.train.precision)  # quantized as trained
    if run.is_adapter():
        return PeftModel.from_pretrained(base, str(run.model_dir)), None, tokenizer
    tuned = load_model(str(run.model_dir), dtype=cfg.model.dtype)
    return tuned, base, tokenizer


def eval_prompts(rows: list[dict], limit: int) -> list:
    """Distinct held-out prompts, in file order, at most `limit`."""
    return distinct_prompts(rows, limit)


def eval_settings(cfg: RunConfig, overrides: list[str] | None, origin: str) -> EvalConfig:
    """The run's `eval` section with `--set eval.KEY=VALUE` overrides applied and validated (one line on error)."""
    raw = {"eval": cfg.eval.model_dump(mode="json")}
    for item in overrides or []:
        parts, _ = parse_override(item)
        if parts[0] != "eval":
            raise UserError(f"--set {item!r}: dpokit eval changes only eval settings (eval.KEY=VALUE); "
                            f"{parts[0]} settings are fixed by the trained run")
    apply_overrides(raw, overrides or [])
    return config_from_dict({**cfg.model_dump(mode="json"), "eval": raw["eval"]}, origin).eval


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, quiet: bool = True) -> EvalResult:
    """Held-out preference metrics and (eval.generate) judged answers of tuned vs base, with KL. Writes
    RUN_DIR/eval.json (with the eval settings used) and RUN_DIR/eval_samples.jsonl. Checks every input (settings,
    judge, held-out pairs) before any model loads. `quiet=False` prints the result tables (the CLI's choice; a
    library call prints nothing)."""
    run = RunDir(run_dir)
    run.require_model()
    cfg = run.read_config()
    settings = eval_settings(cfg, overrides, f"{run.path}: --set")
    cfg = cfg.model_copy(update={"eval": settings})
    rows = run.read_eval_pairs()
    if settings.max_pairs:
        rows = rows[: settings.max_pairs]
    if not rows:
        raise UserError(f"{run.path}: no held-out pairs in {run.eval_pairs}; set data.eval_fraction > 0 or "
                        "data.eval_source")
    images = None
    if is_vision_eval(rows):  # every image read again and the judge checked, before any model loads
        check_vision_judge(settings.judge, settings.generate)
        images = read_eval_images(rows, run.eval_pairs)
    judge = None
    if settings.generate:  # a bad judge config fails here, before any model is loaded or file written
        judge = build_judge(settings.judge, settings.judge_options)
    if images is not None:
        result, samples = evaluate_vision(run, cfg, rows, images, judge)
    else:
        result, samples = _evaluate_text(run, cfg, rows, judge)
    typed = EvalResult.model_validate(result)
    run.write_eval(typed, [EvalSample.model_validate(s) for s in samples])
    if not quiet:
        print_eval_table(typed.model_dump(mode="python"))
    return typed


def _evaluate_text(run: RunDir, cfg: RunConfig, rows: list[dict], judge) -> tuple[dict, list[dict]]:
    """eval.json's content and the sample records of a text run."""
    settings = cfg.eval
    tuned, base, tokenizer = load_tuned_and_base(run, cfg)
    setup_chat_template(tokenizer, cfg.data.chat_template)
    encoded, _ = encode_rows(rows, tokenizer, cfg.data, origin=str(run.eval_pairs))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tuned.to(device)
    if base is not None:
        base.to(device)
    bs = settings.batch_size
    if encoded and "responses_ids" in encoded[0]:  # ranked or unpaired rows
        extra = feedback_metrics(tuned, base, encoded, tokenizer.pad_token_id, bs, cfg)
        tuned_lp, base_lp = extra.pop("pairs")
    else:
        extra = {}
        tuned_lp = pair_logps(tuned, encoded, tokenizer.pad_token_id, bs, cfg.train.packed)
        with _as_base(tuned, base) as base_model:
            base_lp = (base_logps_from_training(run, base_model, encoded, tokenizer.pad_token_id, bs,
                                                cfg.train.packed)
                       or pair_logps(base_model, encoded, tokenizer.pad_token_id, bs, cfg.train.packed))
    result = {"run_dir": str(run.path), "model": cfg.model.name_or_path, "beta": cfg.train.beta,
              "settings": settings.model_dump(mode="json"),
              "preference": preference_metrics(tuned_lp, base_lp, cfg.train.beta), **extra}
    samples = []
    if judge is not None:
        result["generation"], result["kl"], samples = generation_metrics(
            cfg, judge, eval_prompts(rows, settings.num_prompts), tuned, base, tokenizer, bs)
    return result, samples


def evaluate_vision(run: RunDir, cfg: RunConfig, rows: list[dict], images: list[list], judge) -> tuple[dict, list]:
    """eval.json's content and the sample records of a vision-language run (dpokit.eval.vision)."""
    settings = cfg.eval
    tuned, base, processor = load_vision_models(run, cfg)
    encoded = encode_eval_pairs(rows, images, processor)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tuned.to(device)
    if base is not None:
        base.to(device)
    pad_id, bs = processor.tokenizer.pad_token_id, settings.batch_size
    tuned_lp = pair_logps(tuned, encoded, pad_id, bs)  # image pairs: training's layout, each image encoded once
    with _as_base(tuned, base) as base_model:
        base_lp = pair_logps(base_model, encoded, pad_id, bs)
    result = {"run_dir": str(run.path), "model": cfg.model.name_or_path, "beta": cfg.train.beta,
              "settings": settings.model_dump(mode="json"),
              "preference": preference_metrics(tuned_lp, base_lp, cfg.train.beta)}
    samples = []
    if judge is not None:
        prompts = distinct_vision_prompts(rows, images, settings.num_prompts)
        result["generation"], result["kl"], samples = vision_generation_metrics(
            cfg, judge, prompts, tuned, lambda: _as_base(tuned, base), processor)
    return result, samples


def base_logps_from_training(run: RunDir, base_model, encoded: list[dict], pad_id: int, batch_size: int,
                             packing: bool) -> dict | None:
    """The held-out pairs' base-model log-probs from training's reference precompute (`train.reference:
    precomputed` scores the held-out pairs too), instead of a second forward pass over them; None = compute them.

    Reused only when the stored values are of exactly these pairs (the same token-id hash) and of this base model:
    the first batch is recomputed and must agree within 1e-3 nats, so a reference that was not the base
    (train.reference_model, a warm-started first policy) is never mistaken for it."""
    stored = run.read_reference_eval_logps()
    if not encoded or stored is None:
        return None
    if stored.pairs_fingerprint != pairs_fingerprint(encoded) or len(stored.chosen) != len(encoded):
        return None
    probe = pair_logps(base_model, encoded[:batch_size], pad_id, batch_size, packing)
    for i, (chosen, rejected) in enumerate(zip(stored.chosen[:batch_size], stored.rejected[:batch_size])):
        if abs(probe["chosen"][i] - chosen) > 1e-3 or abs(probe["rejected"][i] - rejected) > 1e-3:
            return None
    return {"chosen": list(stored.chosen), "rejected": list(stored.rejected),
            "chosen_tokens": [len(p["chosen_ids"]) for p in encoded],
            "rejected_tokens": [len(p["rejected_ids"]) for p in encoded]}


def feedback_metrics(tuned, base, encoded: list[dict], pad_id: int, batch_size: int, cfg: RunConfig) -> dict:
    """Ranked rows: `ranking` (pairwise accuracy, Kendall tau); unpaired rows: `unpaired` (accuracy on desirable
    and undesirable answers). `pairs`: (tuned, base) log-probs of the pairs the `preference` section is computed on
    (best vs worst; desirable vs undesirable answers to one prompt)."""
    tuned_v, counts = feedback_logps(tuned, encoded, pad_id, batch_size, cfg.train.packed)
    with _as_base(tuned, base) as base_model:
        base_v, _ = feedback_logps(base_model, encoded, pad_id, batch_size, cfg.train.packed)
    beta = cfg.train.beta
    pairs = (feedback_pairs(encoded, tuned_v, counts), feedback_pairs(encoded, base_v, counts))
    if "scores" in encoded[0]:
        return {"ranking": ranking_metrics(tuned_v, base_v, [r["scores"] for r in encoded], beta), "pairs": pairs}
    return {"unpaired": unpaired_metrics([v[0] for v in tuned_v], [v[0] for v in base_v],
                                         [r["label"] for r in encoded], beta), "pairs": pairs}


class _as_base:
    """Context giving the base model: the separate base, or (LoRA) the tuned model with its adapter disabled."""

    def __init__(self, tuned, base):
        self.tuned, self.base, self._ctx = tuned, base, None

    def __enter__(self):
        if self.base is not None:
            return self.base
        self._ctx = self.tuned.disable_adapter()
        self._ctx.__enter__()
        return self.tuned

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False


def generation_summary(e: EvalConfig, judge: dict, n_prompts: int, outcomes: list[int | None], len_t: list[int],
                       len_b: list[int], scores_t: list[float] | None = None,
                       scores_b: list[float] | None = None) -> dict:
    """eval.json's `generation` from the judged outcomes (tuned's side: +1 = tuned better), the answers' token
    lengths and (pointwise judges) the scores, tuned and base, answer by answer."""
    generation = {
        "n_prompts": n_prompts, "samples_per_prompt": e.samples_per_prompt, "n_samples": len(outcomes),
        "decoding": {"temperature": e.temperature, "top_p": e.top_p, "max_new_tokens": e.max_new_tokens,
                     "seed": e.seed, "engine": e.engine},
        "judge": judge,
        "outcomes": outcome_summary(outcomes),
        "scores": None,
        "lengths": length_summary(base=len_b, tuned=len_t),
        "length_controlled": {"tolerance": e.length_tolerance,
                              "buckets": length_buckets(outcomes, len_t, len_b, e.length_tolerance),
                              "win_rate": length_controlled_win_rate(outcomes, len_t, len_b),
                              "regression": None},
    }
    if scores_t is not None:
        generation["scores"] = {"tuned": interval(scores_t), "base": interval(scores_b),
                                "tuned_values": scores_t, "base_values": scores_b}
        generation["length_controlled"]["regression"] = score_length_regression(scores_t, scores_b, len_t, len_b)
    return generation


def generation_metrics(cfg, judge, prompts: list, tuned, base, tokenizer, batch_size: int):
    """Sample base and tuned answers with identical seeds and decoding; judge tuned vs base; KL on tuned samples.

    Returns (generation dict, kl dict, per-sample records)."""
    e = cfg.eval
    decoding = dict(num_samples=e.samples_per_prompt, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                    top_p=e.top_p, seed=e.seed, batch_size=e.gen_batch_size, system_prompt=cfg.data.system_prompt,
                    engine=e.engine)
    tuned_s = [s for per in sample(tuned, tokenizer, prompts, **decoding) for s in per]
    with _as_base(tuned, base) as base_model:
        base_s = [s for per in sample(base_model, tokenizer, prompts, **decoding) for s in per]
    flat_prompts = [p for p in prompts for _ in range(e.samples_per_prompt)]
    # Outcomes are from the tuned model's side: +1 = tuned answer judged better than the base answer.
    cmp = judge_pairs(judge, flat_prompts, [s.text for s in tuned_s], [s.text for s in base_s])
    len_t = [len(s.response_ids) for s in tuned_s]
    len_b = [len(s.response_ids) for s in base_s]
    generation = generation_summary(e, {"name": e.judge, "kind": getattr(judge, "kind", "pointwise"),
                                        "details": cmp.details}, len(prompts), cmp.outcomes, len_t, len_b,
                                    cmp.scores_a, cmp.scores_b)
    # KL(tuned || base) on the tuned model's own samples, scored by both models at temperature 1.
    # The fast sampler already recorded log pi_tuned of each sampled token (equal to a teacher-forced forward within
    # 1e-4 in fp32, tests/test_sampling.py): only the base model needs a forward.
    p_ids, r_ids = [s.prompt_ids for s in tuned_s], [s.response_ids for s in tuned_s]
    if all(s.token_logps is not None for s in tuned_s):
        lp_t, n_tok = [sum(s.token_logps) for s in tuned_s], [len(s.response_ids) for s in tuned_s]
    else:
        lp_t, n_tok = response_logps(tuned, p_ids, r_ids, tokenizer.pad_token_id, batch_size)
    with _as_base(tuned, base) as base_model:
        lp_b, _ = response_logps(base_model, p_ids, r_ids, tokenizer.pad_token_id, batch_size)
    kl = kl_summary(lp_t, lp_b, n_tok, exact_sampling=e.temperature == 1.0 and e.top_p == 1.0)
    records = []
    for k, (p, t, b) in enumerate(zip(flat_prompts, tuned_s, base_s, strict=False)):
        records.append({"prompt": p, "sample": k % e.samples_per_prompt, "base": b.text, "tuned": t.text,
                        "base_tokens": len_b[k], "tuned_tokens": len_t[k], "outcome": cmp.outcomes[k],
                        "base_score": cmp.scores_b[k] if cmp.scores_b else None,
                        "tuned_score": cmp.scores_a[k] if cmp.scores_a else None,
                        "kl_sequence": lp_t[k] - lp_b[k]})
    return generation, kl, records


def _fmt(metric: dict) -> str:
    low, high = metric["ci"]
    return f"{metric['value']:.3f}  [{low:.3f}, {high:.3f}]"



def print_eval_table(result: dict) -> None:
    console = Console()
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
    ranking, unpaired = result.get("ranking"), result.get("unpaired")
    if ranking:
        table.add_row(f"ranking: pairwise accuracy ({ranking['n_ordered_pairs']} pairs)", _fmt(ranking["pairwise_accuracy"]))
        table.add_row(f"ranking: Kendall tau ({ranking['n_lists']} lists)", _fmt(ranking["kendall_tau"]))
    if unpaired:
        table.add_row(f"desirable answers raised ({unpaired['n_desirable']})", _fmt(unpaired["desirable_accuracy"]))
        table.add_row(f"undesirable answers lowered ({unpaired['n_undesirable']})", _fmt(unpaired["undesirable_accuracy"]))
    console.print(table)
    gen = result.get("generation")
    if not gen:
        return
    out = gen["outcomes"]
    table = Table(title=f"Tuned vs base, judge {gen['judge']['name']} ({gen['n_samples']} answers each, "
                  f"{out['n']} judged, {out['unparseable']} unparseable; 95% CI)")
    table.add_column("metric")
    table.add_column("value [95% CI]", justify="right")
    for name, key in (("wins", "win"), ("ties", "tie"), ("losses", "loss")):
        table.add_row(f"tuned {name} ({out[name]})", _fmt(out[key]))
    table.add_row("win rate (tie = 1/2)", _fmt(out["win_rate"]))
    if gen["length_controlled"].get("win_rate"):
        table.add_row("length-controlled win rate (equal length)", _fmt(gen["length_controlled"]["win_rate"]))
    if gen["scores"]:
        for who in ("base", "tuned"):
            table.add_row(f"mean judge score, {who}", _fmt(gen["scores"][who]))
    for who in ("base", "tuned"):
        table.add_row(f"mean answer length, {who} (tokens)", _fmt(gen["lengths"][who]["mean"]))
    for b in gen["length_controlled"]["buckets"]:
        if b["n"]:
            table.add_row(f"win rate, {b['bucket'].replace('_', ' ')} (n={b['n']})", _fmt(b["win_rate"]))
    reg = gen["length_controlled"]["regression"]
    if reg:
        table.add_row("score gain at equal length (OLS)", _fmt(reg["tuned_effect"]))
    kl = result["kl"]
    table.add_row(f"KL(tuned||base) per answer ({kl['n_samples']} samples)", _fmt(kl["sequence"]))
    table.add_row("KL(tuned||base) per token", _fmt(kl["per_token"]))
    console.print(table)
