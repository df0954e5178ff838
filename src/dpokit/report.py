"""Reports: one self-contained HTML file (plots inlined as base64 PNG, no scripts, no network) plus report.md.

Entry points: `write_report(run_dir) -> Path` (a run), `write_sweep_report(sweep_dir, rows) -> Path` (a sweep) and
`write_iterate_report(out_dir, summary) -> Path` (dpokit iterate's rounds).
Reports read only the run folder's artifacts: metrics.jsonl, eval.json, eval_samples.jsonl, config.yaml.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text
from dpokit.core.quant import describe
from dpokit.core.run import RunDir
from dpokit.eval.doctor import NORMAL_SHAPES, diagnose, verdict
from dpokit.eval.outcome import judge_outcome

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; background: #fff; padding: 0 1em; }
h1 { border-bottom: 2px solid #446; } h2 { margin-top: 1.6em; color: #335; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccd; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 14px; }
th { background: #eef; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.samples td { max-width: 420px; white-space: pre-wrap; word-break: break-word; }
.note { color: #555; font-size: 13px; }
.verdict { font-size: 17px; padding: 0.7em 1em; border-radius: 4px; margin: 0.8em 0; }
.verdict.ok { background: #e6f4ea; border-left: 6px solid #3a9d5d; }
.verdict.warn { background: #fff4e0; border-left: 6px solid #d9822b; }
.verdict.bad { background: #fde8e8; border-left: 6px solid #c0392b; }
.finding { border-left: 3px solid #ccd; padding: 0 1em; margin: 0.8em 0; }
.finding.warning { border-left-color: #d9822b; }
"""


# --- plotting ----------------------------------------------------------------------------------------------------

def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def training_curves(rows: list[dict]) -> bytes | None:
    """Loss, implicit-reward accuracy, margin, chosen/rejected rewards against the optimizer step."""
    rows = [r for r in rows if "loss" in r and "step" in r]
    if not rows:
        return None
    panels = [("loss", ["loss"]), ("rewards/accuracies", ["rewards/accuracies"]),
              ("rewards/margins", ["rewards/margins"]), ("rewards", ["rewards/chosen", "rewards/rejected"])]
    fig, axes = _figure(4, 3.4, 2.8)
    for ax, (title, keys) in zip(axes, panels, strict=False):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=False), marker=".", label=key.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    return _png(fig)


def length_histograms(lengths: dict) -> bytes:
    edges = lengths["histogram_edges"]
    fig, axes = _figure(1, 6, 3.2)
    ax = axes[0]
    for who, color in (("base", "#8899aa"), ("tuned", "#dd6633")):
        ax.hist(lengths[who]["values"], bins=edges, alpha=0.6, label=f"{who} (mean {lengths[who]['mean']['value']:.1f})",
                color=color)
    ax.set_xlabel(f"answer length ({lengths['unit']})")
    ax.set_ylabel("answers")
    ax.legend()
    return _png(fig)


def score_distributions(scores: dict) -> bytes:
    fig, axes = _figure(1, 6, 3.2)
    ax = axes[0]
    values = scores["base_values"] + scores["tuned_values"]
    bins = 12 if len(set(values)) > 1 else 1
    for who, color in (("base", "#8899aa"), ("tuned", "#dd6633")):
        ax.hist(scores[f"{who}_values"], bins=bins, range=(min(values), max(values) + 1e-9), alpha=0.6,
                label=f"{who} (mean {scores[who]['value']:.3f})", color=color)
    ax.set_xlabel("judge score")
    ax.set_ylabel("answers")
    ax.legend()
    return _png(fig)


def outcome_bars(outcomes: dict, buckets: list[dict]) -> bytes:
    """Win/tie/loss shares overall and per length bucket, stacked."""
    groups = [("all", outcomes["wins"], outcomes["ties"], outcomes["losses"])]
    groups += [(b["bucket"].replace("_", " "), b["wins"], b["ties"], b["losses"]) for b in buckets if b["n"]]
    fig, axes = _figure(1, 6, 3.0)
    ax = axes[0]
    labels = [g[0] for g in groups]
    totals = [max(sum(g[1:]), 1) for g in groups]
    left = [0.0] * len(groups)
    for k, (name, color) in enumerate((("win", "#3a9d5d"), ("tie", "#bbbbbb"), ("loss", "#c44e52"))):
        shares = [g[k + 1] / t for g, t in zip(groups, totals, strict=False)]
        ax.barh(labels, shares, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, shares, strict=False)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of judged pairs (tuned vs base)")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def frontier_plot(rows: list[dict], y_label: str) -> bytes:
    """Reward (judge score of the tuned model) against KL(tuned||base), one point per run."""
    fig, axes = _figure(1, 6, 4)
    ax = axes[0]
    pts = [r for r in rows if _finite(r.get("kl")) and _finite(r.get("reward"))]
    base = next((r["base_reward"] for r in rows if _finite(r.get("base_reward"))), None)
    if base is not None:  # the starting point of every run: the base model, at KL 0 from itself
        ax.plot([0.0], [base], marker="s", color="black", linestyle="none", label="base model (KL 0)")
        ax.annotate("base", (0.0, base), textcoords="offset points", xytext=(5, -12), fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
    for r in pts:
        xerr = _yerr(r["kl"], r.get("kl_ci"))
        yerr = _yerr(r["reward"], r.get("reward_ci"))
        ax.errorbar(r["kl"], r["reward"], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.annotate(r["label"], (r["kl"], r["reward"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if len(pts) > 1:
        ordered = sorted(pts, key=lambda r: r["kl"])
        ax.plot([r["kl"] for r in ordered], [r["reward"] for r in ordered], "--", color="#999", linewidth=1)
    ax.set_xlabel("KL(tuned || base) per answer (nats)")
    ax.set_ylabel(y_label)
    ax.set_title("reward vs KL frontier")
    return _png(fig)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _yerr(value, ci):
    if not ci or not all(_finite(c) for c in ci):
        return None
    return [[max(value - ci[0], 0)], [max(ci[1] - value, 0)]]


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


def selection_section(run: RunDir) -> tuple[str, list[str]]:
    """The checkpoints `train.select: best_judge` evaluated, the kept one marked: (html, markdown lines); empty
    when the run kept its last step without a selection (select: last)."""
    record = run.read_selection()
    if record is None or not record.points:
        return "", []
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
    body = (f'<h2 id="selection">Checkpoints evaluated during training</h2>'
            f"{_html_table(SELECTION_HEADER, rows, cls='selection')}<p class=\"note\">{html.escape(note)}</p>")
    md = ["## Checkpoints evaluated during training", "", _md_table(SELECTION_HEADER, rows), "", note, ""]
    return body, md


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(c) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _sample_rows(samples: list[dict], limit: int) -> list[list[str]]:
    marks = {1: "tuned", 0: "tie", -1: "base", None: "unparseable"}
    rows = []
    for s in samples[:limit]:
        rows.append([_prompt_text(s["prompt"]), s["base"], s["tuned"], marks.get(s["outcome"], "?"),
                     f"{_num(s['base_score'])} / {_num(s['tuned_score'])}", f"{s['base_tokens']} / {s['tuned_tokens']}"])
    return rows


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

def _verdict_html(said: str, cls: str) -> str:
    return f'<p id="verdict" class="verdict {cls}">{html.escape(said)}</p>'


def doctor_sections(run: RunDir) -> tuple[str, str, list[str]]:
    """(verdict HTML, "What your curves mean" HTML, report.md lines: the verdict first), from dpokit.eval.doctor.
    The verdict leads with the outcome (better / no measurable change / worse by the judge)."""
    result = run.read_eval()
    try:
        findings = diagnose(run.path)
    except UserError as err:  # e.g. metrics.jsonl removed: the report still shows the evaluation
        said = f"{judge_outcome(result).line} The doctor did not run: {err}"
        return _verdict_html(said, "warn"), "", [f"**{said}**", ""]
    said = verdict(findings, result)
    direction = judge_outcome(result).direction
    warned = any(f.severity == "warning" for f in findings)
    cls = "bad" if direction == "worse" else "ok" if direction == "better" and not warned else "warn"
    parts = ['<h2 id="curves-meaning">What your curves mean</h2>']
    md = [f"**{said}**", "", "## What your curves mean", ""]
    if not findings:
        parts.append("<p>No rule flagged anything in the curves or the evaluation.</p>")
    for f in findings:
        tries = "".join(f"<li>{html.escape(t)}</li>" for t in f.what_to_try)
        parts.append(f'<div class="finding {f.severity}"><h3>{html.escape(f.id)}: {html.escape(f.title)}</h3>'
                     f"<p><b>Seen:</b> {html.escape(f.evidence)}</p><p><b>Means:</b> {html.escape(f.meaning)}</p>"
                     f"<p><b>Try:</b></p><ul>{tries}</ul>"
                     + (f'<p class="note">Source: {html.escape(f.source)}</p>' if f.source else "") + "</div>")
        md += [f"### {f.id} ({f.severity}): {f.title}", "", f"Seen: {f.evidence}", "", f"Means: {f.meaning}", "", "Try:", "",
               *[f"- {t}" for t in f.what_to_try], ""]
    shapes = "".join(f"<li><b>{html.escape(curve)}</b>: {html.escape(text)}</li>" for curve, text in NORMAL_SHAPES)
    parts += ["<h3>Normal shapes</h3>", f"<ul>{shapes}</ul>",
              '<p class="note">Rules, thresholds and sources: docs/doctor.md; the numbers: dpokit doctor RUN_DIR '
              "--json.</p>"]
    md += ["### Normal shapes", "", *[f"- **{curve}**: {text}" for curve, text in NORMAL_SHAPES], ""]
    return _verdict_html(said, cls), "\n".join(parts), md


# --- documents ---------------------------------------------------------------------------------------------------

def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None, max_samples: int = 20) -> Path:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.md (+ report_plots/*.png). Returns the html."""
    run = RunDir(run_dir)
    run_dir = run.path
    result = run.require_eval().model_dump(mode="python")
    metrics = [row.model_dump() for row in run.read_metrics()]
    samples = [row.model_dump() for row in run.read_eval_samples()]
    out = Path(out) if out else run.report_html
    doctor_verdict, doctor_html, doctor_md = doctor_sections(run)

    plots: dict[str, tuple[str, bytes]] = {}
    curves = training_curves(metrics)
    if curves:
        plots["training_curves"] = ("Training curves", curves)
    gen = result.get("generation")
    if gen:
        plots["outcomes"] = ("Win / tie / loss, overall and by length bucket",
                             outcome_bars(gen["outcomes"], gen["length_controlled"]["buckets"]))
        plots["lengths"] = ("Answer lengths", length_histograms(gen["lengths"]))
        if gen["scores"]:
            plots["scores"] = ("Judge-score distributions", score_distributions(gen["scores"]))

    title = f"dpokit report: {run_dir.name}"
    trained = training_rows(run)
    selection_html, selection_md = selection_section(run)
    summary = [["held-out pairs", result["preference"]["n_pairs"]]]
    if gen:
        d = gen["decoding"]
        summary += [["judge", f"{gen['judge']['name']} ({gen['judge']['kind']})"],
                    ["generation", f"{gen['n_prompts']} prompts x {gen['samples_per_prompt']} samples, temperature "
                                   f"{d['temperature']}, top_p {d['top_p']}, max_new_tokens {d['max_new_tokens']}, "
                                   f"seed {d['seed']}"]]
    table_rows = [list(r) for r in metric_rows(result)]
    parts = [doctor_verdict, f"<h1>{html.escape(title)}</h1>",  # the outcome is the page's first line
             '<h2 id="how-trained">How it was trained</h2>',
             _html_table(TRAINING_HEADER, trained, cls="training"), selection_html,
             "<h2>How it was evaluated</h2>",
             _html_table(["setting", "value"], [[str(a), str(b)] for a, b in summary]), doctor_html,
             "<h2>Evaluation (95% confidence intervals)</h2>",
             _html_table(["section", "metric", "value [95% CI]"], table_rows),
             '<p class="note">Win/tie/loss is the tuned model\'s answer against the base model\'s answer for the same '
             "prompt and seed. Proportions use Wilson intervals, means normal intervals. KL is estimated on the tuned "
             "model's own samples.</p>"]
    for caption, png in plots.values():
        parts += [f"<h2>{html.escape(caption)}</h2>", _img(png, caption)]
    if samples:
        parts += [f"<h2>Samples (first {min(len(samples), max_samples)} of {len(samples)})</h2>",
                  _html_table(SAMPLE_HEADER, _sample_rows(samples, max_samples), cls="samples")]
    atomic_write_text(out, _page(title, "\n".join(parts)))

    # report.md: the same tables; plots as PNG files next to it (Markdown viewers rarely show data URIs).
    plot_dir = out.parent / "report_plots"
    md = [*doctor_md[:2], f"# {title}", "", "## How it was trained", "", _md_table(TRAINING_HEADER, trained), "",
          *selection_md, "## How it was evaluated", "", _md_table(["setting", "value"], [[str(a), str(b)] for a, b in summary]), "",
          *doctor_md[2:],
          "## Evaluation (95% confidence intervals)", "", _md_table(["section", "metric", "value [95% CI]"], table_rows)]
    for key, (caption, png) in plots.items():
        plot_dir.mkdir(exist_ok=True)
        (plot_dir / f"{key}.png").write_bytes(png)
        md += ["", f"## {caption}", "", f"![{caption}](report_plots/{key}.png)"]
    if samples:
        md += ["", "## Samples", "", _md_table(SAMPLE_HEADER, _sample_rows(samples, max_samples))]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    return out


def write_sweep_report(sweep_dir: str | Path, rows: list[dict], y_label: str) -> Path:
    """sweep.html + sweep.md: the reward-vs-KL frontier and one row per run."""
    sweep_dir = Path(sweep_dir)
    png = frontier_plot(rows, y_label)
    header = ["run", "KL per answer [95% CI]", f"{y_label} [95% CI]", "implicit-reward accuracy", "run folder"]

    def ci(v, c):
        return _ci({"value": v, "ci": c}) if _finite(v) and c else _num(v)

    table = [[r["label"], ci(r["kl"], r.get("kl_ci")), ci(r["reward"], r.get("reward_ci")),
              _num(r.get("accuracy")), r["run_dir"]] for r in rows]
    title = f"dpokit sweep: {sweep_dir.name}"
    body = [f"<h1>{html.escape(title)}</h1>", "<h2>Reward vs KL</h2>", _img(png, "reward vs KL frontier"),
            "<h2>Runs</h2>", _html_table(header, table)]
    out = sweep_dir / "sweep.html"
    atomic_write_text(out, _page(title, "\n".join(body)))
    (sweep_dir / "sweep_frontier.png").write_bytes(png)
    atomic_write_text(sweep_dir / "sweep.md", "\n".join([f"# {title}", "", "![reward vs KL](sweep_frontier.png)", "",
                                                        _md_table(header, table)]) + "\n")
    return out


def iterate_curves(rounds: list[dict], offline: dict | None, initial: dict | None) -> bytes:
    """Mean judge score, win rate vs pi0 and KL from pi0 against the round (round 0 = pi0); the offline arm as a
    dashed line at its value."""
    panels = [("mean_score", "mean judge score, tuned"), ("win_rate_vs_initial", "win rate vs pi0"),
              ("kl_from_initial", "KL from pi0 per answer (nats)")]
    fig, axes = _figure(3, 3.6, 3.0)
    start = {"mean_score": (initial or {}).get("mean_score"), "win_rate_vs_initial": 0.5, "kl_from_initial": 0.0}
    for ax, (key, title) in zip(axes, panels, strict=True):
        pts = [(0, start[key], None)] if _finite(start[key]) else []
        pts += [(r["round"], r[key], r.get(f"{key}_ci")) for r in rounds if _finite(r.get(key))]
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            errs = [_yerr(y, ci) or [[0], [0]] for _, y, ci in pts]
            ax.errorbar(xs, ys, yerr=[[e[0][0] for e in errs], [e[1][0] for e in errs]], marker="o", capsize=3,
                        label="iterative")
        if offline and _finite(offline.get(key)):
            ax.axhline(offline[key], color="#c44e52", linestyle="--", label="offline arm")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round (0 = pi0)")
        ax.set_xticks(range(0, len(rounds) + 1))
        if offline:
            ax.legend(fontsize=7)
    return _png(fig)


def write_iterate_report(out_dir: str | Path, summary: dict) -> Path:
    """iterate.html (self-contained) for `dpokit iterate`: the per-round table and curves, and every round plus the
    offline arm on one reward-vs-KL frontier. Reads only the summary (iterate.json's content)."""
    out_dir = Path(out_dir)
    rounds, offline, initial = summary["rounds"], summary.get("offline"), summary.get("initial") or {}
    pointwise = any(_finite(r.get("mean_score")) for r in rounds)
    y_label = f"mean {summary.get('judge')} score, tuned" if pointwise else "win rate vs pi0"
    y_key = "mean_score" if pointwise else "win_rate_vs_initial"
    arms = [(f"round {r['round']}", r) for r in rounds] + ([("offline", offline)] if offline else [])
    points = [{"label": label, "kl": r["kl_from_initial"], "kl_ci": r.get("kl_from_initial_ci"), "reward": r[y_key],
               "reward_ci": r.get(f"{y_key}_ci"), "base_reward": initial.get("mean_score") if pointwise else 0.5}
              for label, r in arms]

    def ci(value, interval, digits=3):
        return _ci({"value": value, "ci": interval}) if _finite(value) and interval else _num(value, digits)

    header = ["", "win rate vs pi0 [95% CI]", "win rate vs previous [95% CI]", "mean score [95% CI]",
              "KL from pi0 [95% CI]", "mean length (tokens)", "distinct-2", "pairs", "steps", "seconds"]
    table = [["pi0", "0.500", "–", ci(initial.get("mean_score"), initial.get("mean_score_ci")), "0",
              _num(initial.get("mean_length"), 1), _num(initial.get("distinct_2")), "–", "–", "–"]] if initial else []
    table += [[label, ci(r["win_rate_vs_initial"], r["win_rate_vs_initial_ci"]),
               ci(r.get("win_rate_vs_previous"), r.get("win_rate_vs_previous_ci")),
               ci(r.get("mean_score"), r.get("mean_score_ci")), ci(r["kl_from_initial"], r.get("kl_from_initial_ci")),
               _num(r.get("mean_length"), 1), _num(r.get("distinct_2")), _num(r.get("pairs")), _num(r.get("steps")),
               _num(r.get("seconds"), 0)] for label, r in arms]
    title = f"dpokit iterate: {out_dir.name}"
    vs = summary.get("last_round_vs_offline")
    said, direction = summary.get("verdict"), summary.get("outcome")
    cls = "bad" if direction == "worse" else "ok" if direction == "better" else "warn"
    parts = ([_verdict_html(said, cls)] if said else []) + [
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{html.escape(str(summary.get("model")))}, judge {html.escape(str(summary.get("judge")))}'
             f", reference {html.escape(str(summary.get('reference')))}, {len(rounds)} of "
             f"{summary.get('rounds_planned', len(rounds))} rounds, {summary.get('held_out_prompts')} held-out "
             "prompts. Win rates and KL are against pi0 (the starting model); \"previous\" compares each round's "
             "answers with the round before's (round 1: with pi0's), same prompts, seeds and decoding.</p>",
             "<h2>Per round</h2>", _html_table(header, table)]
    if vs:
        parts.append(f"<p>Last round vs the offline arm (same prompts and seeds), win rate: "
                     f"{html.escape(ci(vs['win_rate'], vs['win_rate_ci']))}</p>")
    parts += ["<h2>Score, win rate and KL by round</h2>", _img(iterate_curves(rounds, offline, initial), "by round"),
              "<h2>Reward vs KL</h2>", _img(frontier_plot(points, y_label), "reward vs KL frontier")]
    out = out_dir / "iterate.html"
    atomic_write_text(out, _page(title, "\n".join(parts)))
    return out
