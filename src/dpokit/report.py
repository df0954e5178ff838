"""Reports: one self-contained HTML file (plots inlined as base64 PNG, no scripts, no network) plus report.md.

Entry points: `write_report(run_dir) -> Path` (a run), `write_sweep_report(sweep_dir, rows) -> Path` (a sweep) and
`write_iterate_report(out_dir, summary) -> Path` (dpokit iterate's rounds).
Reports read only the run folder's artifacts: metrics.jsonl, eval.json, eval_samples.jsonl, config.yaml.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import jinja2
from markupsafe import Markup

from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text, image_data_uri
from dpokit.core.quant import describe
from dpokit.core.run import RunDir
from dpokit.eval.doctor import NORMAL_SHAPES, diagnose, verdict
from dpokit.eval.outcome import judge_outcome
from dpokit.plots import (
    finite,
    frontier_plot,
    iterate_curves,
    length_histograms,
    outcome_bars,
    score_distributions,
    training_curves,
)

# --- tables ------------------------------------------------------------------------------------------------------

def _num(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def _ci(metric: dict | None) -> str:
    if not metric:
        return "–"
    low, high = metric["ci"]
    return f"{_num(metric['value'])} [{_num(low)}, {_num(high)}]"


def metric_rows(result: dict) -> list[tuple[str, str, str]]:
    """(section, metric, value [95% CI]) for every headline number of eval.json."""
    rows = []
    pref = result["preference"]
    n = pref["n_pairs"]
    rows.append(("preference", f"implicit-reward accuracy (n={n})", _ci(pref["implicit_reward_accuracy"])))
    rows.append(("preference", "mean implicit-reward margin", _ci(pref["reward_margin"])))
    for who in ("base", "tuned"):
        for kind, label in (("sum", "sum"), ("mean_per_token", "per token")):
            rows.append(("preference", f"likelihood accuracy, {who} ({label})",
                         _ci(pref["likelihood_accuracy"][who][kind])))
    gen = result.get("generation")
    if gen:
        out = gen["outcomes"]
        for key, label in (("win", "wins"), ("tie", "ties"), ("loss", "losses")):
            rows.append(("generation", f"tuned {label} ({out[label]} of {out['n']})", _ci(out[key])))
        rows.append(("generation", "win rate, tie = 1/2", _ci(out["win_rate"])))
        lc = gen["length_controlled"].get("win_rate")
        if lc:
            rows.append(("generation", "length-controlled win rate (at equal length, logistic)", _ci(lc)))
        rows.append(("generation", "unparseable judge answers (pairs)", str(out["unparseable"])))
        if gen["scores"]:
            for who in ("base", "tuned"):
                rows.append(("generation", f"mean judge score, {who}", _ci(gen["scores"][who])))
        for who in ("base", "tuned"):
            rows.append(("generation", f"mean answer length, {who} (tokens)", _ci(gen["lengths"][who]["mean"])))
        reg = gen["length_controlled"]["regression"]
        if reg:
            rows.append(("length control", "judge-score gain at equal length (OLS)", _ci(reg["tuned_effect"])))
            rows.append(("length control", "judge score per extra token (OLS)", _ci(reg["per_token"])))
        for b in gen["length_controlled"]["buckets"]:
            rows.append(("length control", f"win rate, {b['bucket'].replace('_', ' ')} (n={b['n']})",
                         _ci(b["win_rate"]) if b["n"] else "–"))
    kl = result.get("kl")
    if kl:
        rows.append(("KL", f"KL(tuned||base) per answer (n={kl['n_samples']})", _ci(kl["sequence"])))
        rows.append(("KL", f"KL(tuned||base) per token ({kl['total_tokens']} tokens)", _ci(kl["per_token"])))
    return rows


SELECTION_HEADER = ["step", "win rate vs base [95% CI]", "wins / ties / losses", "mean judge score [95% CI]",
                    "KL per answer (nats) [95% CI]", "mean tokens", "kept"]


def selection_context(run: RunDir) -> dict | None:
    """The checkpoints `train.select: best_judge` evaluated, the kept one marked: {header, rows, note}; None when
    the run kept its last step without a selection (select: last)."""
    record = run.read_selection()
    if record is None or not record.points:
        return None
    rows = []
    for p in record.points:
        o = p.outcomes
        rows.append([str(p.step), _ci(p.win_rate.model_dump()), f"{o['wins']} / {o['ties']} / {o['losses']}",
                     _ci(p.mean_score.model_dump()) if p.mean_score else "–",
                     _ci(p.kl.model_dump()) if p.kl else "–", f"{p.mean_tokens:.1f}",
                     "kept (the run's model)" if p.step == record.kept_step else ""])
    base = f", base mean score {_ci(record.base_mean_score.model_dump())}" if record.base_mean_score else ""
    which = ("the last step" if record.kept_step == record.final_step
             else f"step {record.kept_step}, not the last step {record.final_step}")
    note = (f"train.select: best_judge kept {which}. {len(record.prompts)} held-out prompts, one answer each, judged "
            f"by {record.judge} against the base answers{base}; {record.overlap_with_eval_prompts} of them also "
            f"in the final evaluation. Criterion: {record.criterion}. Cost {record.seconds:.1f} s.")
    return {"header": SELECTION_HEADER, "rows": rows, "note": note}


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {_content_text(m['content'])}" for m in prompt)


def _content_text(content) -> str:
    """A message's content as text: a vision prompt's parts with each image as [image]."""
    if not isinstance(content, list):
        return str(content)
    return "".join("[image] " if isinstance(p, dict) and p.get("type") == "image" else
                   str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)


THUMBNAIL_PX = 96  # the longer side of a report thumbnail


def thumbnail(path: str) -> dict:
    """A sample's image for the HTML report: {src: a data URI at most THUMBNAIL_PX a side, alt, path, missing: None},
    or src None and `missing` saying why when the file cannot be read now (moved since the evaluation)."""
    try:
        src = image_data_uri(path, THUMBNAIL_PX)
    except (OSError, ValueError) as err:
        src, missing = None, f"image {path} cannot be read ({type(err).__name__})"
    else:
        missing = None
    return {"src": src, "alt": f"prompt image {Path(path).name}", "path": path, "missing": missing}


def _sample_rows(samples: list[dict], limit: int, fmt: str = "html") -> list[list[str]]:
    """The samples table's rows; in Markdown a vision prompt names its image files after the text."""
    marks = {1: "tuned", 0: "tie", -1: "base", None: "unparseable"}
    rows = []
    for s in samples[:limit]:
        prompt = _prompt_text(s["prompt"])
        if fmt == "md" and s.get("images"):
            prompt += " (images: " + ", ".join(s["images"]) + ")"
        rows.append([prompt, s["base"], s["tuned"], marks.get(s["outcome"], "?"),
                     f"{_num(s['base_score'])} / {_num(s['tuned_score'])}", f"{s['base_tokens']} / {s['tuned_tokens']}"])
    return rows


def _sample_images(samples: list[dict], limit: int) -> list[list[dict]] | None:
    """Per shown sample, its prompt's images as thumbnails (vision runs); None when no sample has images. One
    thumbnail per distinct file (a prompt answered several times shows the same picture)."""
    if not any(s.get("images") for s in samples[:limit]):
        return None
    cache: dict[str, dict] = {}

    def thumb(path: str) -> dict:
        if path not in cache:
            cache[path] = thumbnail(path)
        return cache[path]

    return [[thumb(p) for p in s.get("images") or []] for s in samples[:limit]]


def training_rows(run: RunDir) -> list[list[str]]:
    """(setting, value) rows of "How it was trained", from config.yaml, data/report.json and train_summary.json."""
    cfg = run.read_config()
    t = cfg.train
    summary = run.read_train_summary()
    data = run.read_data_report()
    rows = [["model", cfg.model.name_or_path + (f" (revision {cfg.model.revision})" if cfg.model.revision else "")]]
    if t.lora is not None:
        targets = t.lora.target_modules
        rows.append(["fine-tuning", f"LoRA r={t.lora.r}, alpha={t.lora.alpha}, targets "
                                    f"{', '.join(targets) if isinstance(targets, list) else targets}"])
    else:
        rows.append(["fine-tuning", "full (every weight trained)"])
    if cfg.model.quantization != "none":  # QLoRA: the base computed quantized, in training and in evaluation
        rows.append(["quantization", f"{describe(cfg.model)} base, LoRA on top"])
    rows += [["loss", f"{t.loss}, beta {t.beta:g}" + (f", sft_weight {t.sft_weight:g}" if t.sft_weight else "")],
             ["learning rate", f"{t.learning_rate:g} ({t.lr_scheduler}, warmup {t.warmup_steps} steps)"],
             ["batch", f"{t.batch_size} x {t.grad_accum} accumulation" + (", packed" if t.packed else "")]]
    if summary:
        epochs = summary.metrics.get("epoch")
        rows.append(["steps", f"{summary.global_step} optimizer steps" + (f", {epochs:g} epochs" if epochs else "")])
        rows.append(["reference", summary.reference + (f" (cache {summary.reference_cache.cache})"
                                                       if summary.reference_cache else "")])
        rows.append(["precision", summary.precision or "not recorded"])
        rows.append(["training time", f"{summary.wall_seconds:.1f} s (model loading included)"
                     + (f", resumed from {summary.resumed_from}" if summary.resumed_from else "")])
        if summary.metrics.get("train_loss") is not None:
            rows.append(["final train loss", f"{summary.metrics['train_loss']:.4f} (mean over every step)"])
        check = summary.step0_check
        if check:
            rows.append(["step-0 check", (f"passed: loss {check.sigmoid_loss:.6f} = ln 2, the reference equals the "
                                          "initial policy") if check.policy_equals_reference else
                         f"differs: loss {check.sigmoid_loss:.6f} vs ln 2 {check.ln2:.6f}"])
        else:
            rows.append(["step-0 check", "not run (reference-free loss or other engine)"])
    else:
        rows.append(["training", "train_summary.json missing (training did not finish?)"])
    if data:
        rows.append(["data", f"{Path(data.source).name if Path(data.source).exists() else data.source} "
                             f"({data.format}): {data.n_train} train rows, {data.n_eval} held out"])
    versions = (summary.versions if summary else None) or {}
    if versions:
        rows.append(["versions", ", ".join(f"{k} {v}" for k, v in versions.items())])
    when = summary.finished if summary and summary.finished else None
    if when:
        import datetime

        rows.append(["date", datetime.datetime.fromtimestamp(when, tz=datetime.timezone.utc)
                     .strftime("%Y-%m-%d %H:%M UTC")])
    return rows


TRAINING_HEADER = ["setting", "value"]
SAMPLE_HEADER = ["prompt", "base", "tuned", "judge prefers", "score base / tuned", "tokens base / tuned"]


# --- the doctor's verdict ---------------------------------------------------------------------------------------

def doctor_context(run: RunDir) -> tuple[dict, dict | None]:
    """({text, cls} of the verdict, {findings, shapes} for "What your curves mean" or None when the doctor could not
    run), from dpokit.eval.doctor. The verdict leads with the outcome (better / no measurable change / worse)."""
    result = run.read_eval()
    try:
        findings = diagnose(run.path)
    except UserError as err:  # e.g. metrics.jsonl removed: the report still shows the evaluation
        return {"text": f"{judge_outcome(result).line} The doctor did not run: {err}", "cls": "warn"}, None
    direction = judge_outcome(result).direction
    warned = any(f.severity == "warning" for f in findings)
    cls = "bad" if direction == "worse" else "ok" if direction == "better" and not warned else "warn"
    return {"text": verdict(findings, result), "cls": cls}, {"findings": findings, "shapes": NORMAL_SHAPES}


# --- documents: one context per report, rendered by templates/<name>.html.j2 and <name>.md.j2 -------------------

def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _html_text(value):
    """Every `{{ value }}` of an HTML template as html.escape writes it (quotes too: `'` is &#x27;, as the reports
    always wrote it); Markup (a macro's output) passes through."""
    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


def _environment(fmt: str) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("dpokit", "templates"), autoescape=fmt == "html",
                             finalize=_html_text if fmt == "html" else None, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["md_cell"] = _md_cell
    return env


ENVIRONMENTS = {fmt: _environment(fmt) for fmt in ("html", "md")}


def render(name: str, fmt: str, context: dict) -> str:
    """templates/NAME.FMT.j2 with the context; HTML escapes every value (user text stays text), Markdown does not."""
    return ENVIRONMENTS[fmt].get_template(f"{name}.{fmt}.j2").render(**context)


def _write(out_html: Path, name: str, context: dict, plots: dict[str, bytes], plot_dir: Path) -> None:
    """NAME's HTML (plots inlined as base64) at out_html and its Markdown beside it (plots as PNG files in
    plot_dir, since Markdown viewers rarely show data URIs)."""
    inlined = {key: base64.b64encode(png).decode() for key, png in plots.items()}
    atomic_write_text(out_html, render(name, "html", {**context, "png": inlined}))
    if plots:
        plot_dir.mkdir(parents=True, exist_ok=True)
    for key, png in plots.items():
        (plot_dir / f"{key}.png").write_bytes(png)
    files = {key: (plot_dir / f"{key}.png").relative_to(out_html.parent).as_posix() for key in plots}
    atomic_write_text(out_html.with_suffix(".md"), render(name, "md", {**context, "png": files}))


def _run_plots(metrics: list[dict], gen: dict | None) -> list[tuple[str, str, bytes]]:
    """(key, caption, png) of a run's plots: training curves, then the generation plots when it generated."""
    plots = []
    curves = training_curves(metrics)
    if curves:
        plots.append(("training_curves", "Training curves", curves))
    if gen:
        plots.append(("outcomes", "Win / tie / loss, overall and by length bucket",
                      outcome_bars(gen["outcomes"], gen["length_controlled"]["buckets"])))
        plots.append(("lengths", "Answer lengths", length_histograms(gen["lengths"])))
        if gen["scores"]:
            plots.append(("scores", "Judge-score distributions", score_distributions(gen["scores"])))
    return plots


def _evaluated_rows(result: dict) -> list[list[str]]:
    rows = [["held-out pairs", str(result["preference"]["n_pairs"])]]
    gen = result.get("generation")
    if gen:
        d = gen["decoding"]
        rows += [["judge", f"{gen['judge']['name']} ({gen['judge']['kind']})"],
                 ["generation", f"{gen['n_prompts']} prompts x {gen['samples_per_prompt']} samples, temperature "
                                f"{d['temperature']}, top_p {d['top_p']}, max_new_tokens {d['max_new_tokens']}, "
                                f"seed {d['seed']}"]]
    return rows


def write_report(run_dir: str | Path, out: str | Path | None = None, max_samples: int = 20) -> Path:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.md (+ report_plots/*.png). Returns the html."""
    run = RunDir(run_dir)
    result = run.require_eval().model_dump(mode="python")
    metrics = [row.model_dump() for row in run.read_metrics()]
    samples = [row.model_dump() for row in run.read_eval_samples()]
    out = Path(out) if out else run.report_html
    said, doctor = doctor_context(run)
    plots = _run_plots(metrics, result.get("generation"))
    context = {"title": f"dpokit report: {run.path.name}", "verdict": said, "doctor": doctor,
               "training": {"header": TRAINING_HEADER, "rows": training_rows(run)},
               "selection": selection_context(run),
               "evaluated": {"header": ["setting", "value"], "rows": _evaluated_rows(result)},
               "metrics": {"header": ["section", "metric", "value [95% CI]"],
                           "rows": [list(r) for r in metric_rows(result)]},
               "plots": [{"key": key, "caption": caption} for key, caption, _ in plots],
               "samples": {"header": SAMPLE_HEADER, "rows": _sample_rows(samples, max_samples),
                           "md_rows": _sample_rows(samples, max_samples, "md"),
                           "images": _sample_images(samples, max_samples),
                           "shown": min(len(samples), max_samples), "total": len(samples)} if samples else None}
    _write(out, "run", context, {key: png for key, _, png in plots}, out.parent / "report_plots")
    return out


def write_sweep_report(sweep_dir: str | Path, rows: list[dict], y_label: str) -> Path:
    """sweep.html + sweep.md (+ sweep_frontier.png): the reward-vs-KL frontier and one row per run."""
    sweep_dir = Path(sweep_dir)
    header = ["run", "KL per answer [95% CI]", f"{y_label} [95% CI]", "implicit-reward accuracy", "run folder"]
    table = [[r["label"], _value_ci(r["kl"], r.get("kl_ci")), _value_ci(r["reward"], r.get("reward_ci")),
              _num(r.get("accuracy")), r["run_dir"]] for r in rows]
    context = {"title": f"dpokit sweep: {sweep_dir.name}", "verdict": None, "runs": {"header": header, "rows": table}}
    out = sweep_dir / "sweep.html"
    _write(out, "sweep", context, {"sweep_frontier": frontier_plot(rows, y_label)}, sweep_dir)
    return out


def _value_ci(value, interval, digits: int = 3) -> str:
    """"value [lo, hi]" when both are there, else the value alone."""
    return _ci({"value": value, "ci": interval}) if finite(value) and interval else _num(value, digits)


ITERATE_HEADER = ["", "win rate vs pi0 [95% CI]", "win rate vs previous [95% CI]", "mean score [95% CI]",
                  "KL from pi0 [95% CI]", "mean length (tokens)", "distinct-2", "pairs", "steps", "seconds"]


def _iterate_rows(arms: list[tuple[str, dict]], initial: dict) -> list[list[str]]:
    rows = [["pi0", "0.500", "–", _value_ci(initial.get("mean_score"), initial.get("mean_score_ci")), "0",
             _num(initial.get("mean_length"), 1), _num(initial.get("distinct_2")), "–", "–", "–"]] if initial else []
    rows += [[label, _value_ci(r["win_rate_vs_initial"], r["win_rate_vs_initial_ci"]),
              _value_ci(r.get("win_rate_vs_previous"), r.get("win_rate_vs_previous_ci")),
              _value_ci(r.get("mean_score"), r.get("mean_score_ci")),
              _value_ci(r["kl_from_initial"], r.get("kl_from_initial_ci")), _num(r.get("mean_length"), 1),
              _num(r.get("distinct_2")), _num(r.get("pairs")), _num(r.get("steps")), _num(r.get("seconds"), 0)]
             for label, r in arms]
    return rows


def write_iterate_report(out_dir: str | Path, summary: dict) -> Path:
    """iterate.html (self-contained) and iterate.md (+ iterate_plots/*.png) for `dpokit iterate`: the per-round
    table and curves, and every round plus the offline arm on one reward-vs-KL frontier. Reads only the summary
    (iterate.json's content)."""
    out_dir = Path(out_dir)
    rounds, offline, initial = summary["rounds"], summary.get("offline"), summary.get("initial") or {}
    pointwise = any(finite(r.get("mean_score")) for r in rounds)
    y_label = f"mean {summary.get('judge')} score, tuned" if pointwise else "win rate vs pi0"
    y_key = "mean_score" if pointwise else "win_rate_vs_initial"
    arms = [(f"round {r['round']}", r) for r in rounds] + ([("offline", offline)] if offline else [])
    points = [{"label": label, "kl": r["kl_from_initial"], "kl_ci": r.get("kl_from_initial_ci"), "reward": r[y_key],
               "reward_ci": r.get(f"{y_key}_ci"), "base_reward": initial.get("mean_score") if pointwise else 0.5}
              for label, r in arms]
    said, direction = summary.get("verdict"), summary.get("outcome")
    vs = summary.get("last_round_vs_offline")
    context = {"title": f"dpokit iterate: {out_dir.name}",
               "verdict": {"text": said, "cls": "bad" if direction == "worse" else "ok" if direction == "better"
                           else "warn"} if said else None,
               "setup": (f"{summary.get('model')}, judge {summary.get('judge')}, reference {summary.get('reference')}, "
                         f"{len(rounds)} of {summary.get('rounds_planned', len(rounds))} rounds, "
                         f"{summary.get('held_out_prompts')} held-out prompts. Win rates and KL are against pi0 (the "
                         "starting model); \"previous\" compares each round's answers with the round before's "
                         "(round 1: with pi0's), same prompts, seeds and decoding."),
               "rounds": {"header": ITERATE_HEADER, "rows": _iterate_rows(arms, initial)},
               "vs_offline": _value_ci(vs["win_rate"], vs["win_rate_ci"]) if vs else None}
    plots = {"by_round": iterate_curves(rounds, offline, initial), "frontier": frontier_plot(points, y_label)}
    out = out_dir / "iterate.html"
    _write(out, "iterate", context, plots, out_dir / "iterate_plots")
    return out
