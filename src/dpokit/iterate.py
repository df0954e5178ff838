"""`dpokit iterate`: iterative on-policy DPO. Each round samples answers with the current policy, judges them,
keeps best vs worst as pairs, trains, and evaluates against pi0 (the starting model) and the previous round;
`--compare-offline` adds a budget-matched offline arm.

One LoRA adapter is continued from round to round (`train.lora.init_from`), never merged and never stacked:
- the base weights stay pi0, so the policy with its adapter disabled *is* pi0, at no cost. The reference
  `initial` is `train.reference: adapter`, and every round's evaluation (win rate and KL against its base) is
  against pi0 without a second copy of the weights;
- merging each round into the weights would lose pi0 unless a full copy were kept beside it (twice the memory,
  a merged folder per round);
- stacking a new adapter per round would put every earlier adapter in each forward: each round would cost more
  than the one before. A continued adapter costs the same every round.
Full fine-tunes are refused for now (they would need the pi0 copy above).

`iterate.reference: previous` computes the reference log-probs once per round from the policy as it starts the
round (`train.reference: precomputed` after the adapter is loaded): the reference cache key holds the adapter's
weights, so each round gets its own.

DIR (`--out`) holds:
  .dpokit-iterate      marker: DIR was written by dpokit iterate (anything else is refused)
  pairs/eval.jsonl     held-out pairs, sampled once from pi0 and reused every round (eval.json: key, counts)
  pairs/round-K.jsonl  round K's pairs, sampled by the policy at the round's start (round-K.json: key, counts)
  pairs/offline.jsonl  --compare-offline: round 1's pairs plus pi0's pairs on the other rounds' prompts
  round-K/             a normal run folder (`dpokit eval`, `report`, `doctor` read it); model/ is the adapter so far
  offline/             --compare-offline: the offline arm, trained from pi0 for the rounds' total optimizer steps
  iterate.json         one entry per finished round (and `offline`); written after every round
  iterate.html         score, win rate vs pi0 and KL per round; every round and the offline arm on one frontier
  iterate.md           the same report in Markdown, its plots in iterate_plots/

An interrupted iterate continues where it stopped: finished rounds (in iterate.json with the same settings key, and
an eval.json) are kept, a round with a checkpoint resumes from it (`train.save_steps`), and cached pairs are reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import cached_property
from pathlib import Path

from pydantic import Field
from rich.console import Console

from dpokit.core.config import RunConfig, config_from_dict
from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text, read_jsonl, write_jsonl
from dpokit.core.judges import build_judge, check_judge
from dpokit.core.judges import compare as judge_pairs
from dpokit.core.run import SCHEMA_VERSION, Artifact, Model, RunDir, format_interval, parse_artifact
from dpokit.data.generate import (
    model_identity,
    pair_settings,
    read_prompts,
    settings_key,
    split_prompts,
)
from dpokit.eval.doctor import answer_units, distinct_n, run_verdict
from dpokit.eval.metrics import outcome_summary
from dpokit.pipeline import (
    bundled_config_path,
    claim_out_dir,
    evaluate_unless_done,
    load_generating_config,
    render_table,
    sample_best_vs_worst,
    train_unless_finished,
)
from dpokit.report import write_iterate_report
from dpokit.train.plan import plan_training

PLACEHOLDER_SOURCE = "iterate-generated-pairs"


def default_config_path() -> Path:
    return bundled_config_path("iterate.yaml")


# --- iterate.json ------------------------------------------------------------------------------------------------

Interval = list[float | None]


class RoundRecord(Model):
    """One round (or the offline arm, `round` null) as iterate.json records it."""

    round: int | None = Field(description="the round number; null for the offline arm")
    win_rate_vs_initial: float | None = Field(description="judge win rate of this policy over pi0 (tie = 1/2)")
    win_rate_vs_initial_ci: Interval | None
    lc_win_rate_vs_initial: float | None = Field(description="the same at equal answer length")
    lc_win_rate_vs_initial_ci: Interval | None
    win_rate_vs_previous: float | None = Field(description="over the previous round's policy (round 1: pi0)")
    win_rate_vs_previous_ci: Interval | None
    kl_from_initial: float | None = Field(description="KL(policy || pi0) per answer, nats")
    kl_from_initial_ci: Interval | None
    mean_score: float | None = Field(description="mean judge score of its answers (pointwise judges)")
    mean_score_ci: Interval | None
    mean_length: float | None = Field(description="mean answer length, tokens")
    distinct_2: float | None = Field(description="mean distinct-2 of its answers")
    pairs: int | None = Field(description="pairs trained")
    steps: int | None = Field(description="optimizer steps")
    reference: str | None
    step0_check: bool | None = Field(description="whether the policy equalled the reference at step 0")
    resumed_from: str | None
    seconds: float
    run_dir: str
    prompts: int | None = Field(None, description="prompts sampled for the round's pairs")
    key: str | None = Field(None, description="the settings key: a round of other settings is not reused")


class InitialRecord(Model):
    """pi0, from round 1's base answers."""

    mean_score: float | None
    mean_score_ci: Interval | None
    mean_length: float | None
    distinct_2: float | None
    kl_from_initial: float


class OfflineComparison(Model):
    win_rate: float | None = Field(description="the last round's win rate over the offline arm")
    win_rate_ci: Interval | None


class IterateSummary(Artifact):
    """iterate.json: written after every round, read back to continue an interrupted iterate."""

    model: str | None = None
    judge: str | None = None
    reference: str | None = Field(None, description="iterate.reference: `initial` or `previous`")
    rounds_planned: int | None = None
    held_out_prompts: int | None = None
    config: RunConfig | None = Field(None, description="the resolved config every round started from")
    rounds: list[RoundRecord] = Field(default_factory=list)
    initial: InitialRecord | None = None
    offline: RoundRecord | None = None
    last_round_vs_offline: OfflineComparison | None = None
    verdict: str | None = Field(None, description="the last round vs pi0, as the report's first line says it")
    outcome: str | None = None
    wall_seconds: float | None = None
    report: str | None = None


def load_iterate_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """The run config; data.source is left to iterate (its pairs are generated every round)."""
    return load_generating_config(path, "iterate.yaml", "iterate", PLACEHOLDER_SOURCE, overrides)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class Iteration:
    """The checked inputs of an iterate: config, prompt chunks, folders and settings keys. Built by `plan_iterate`
    before anything is written or loaded."""

    def __init__(self, cfg: RunConfig, out: Path, chunks: list[list], held: list):
        self.cfg, self.out, self.chunks, self.held = cfg, out, chunks, held

    @cached_property
    def settings(self) -> dict:
        """What a round's result depends on besides its prompts: the config (not the folders, not how many rounds
        or whether an offline arm follows) and the model's identity (an alias resolves, i.e. builds, here)."""
        dump = self.cfg.model_dump(mode="json")
        dump.pop("output")
        dump["iterate"] = {k: v for k, v in dump["iterate"].items() if k not in ("rounds", "compare_offline")}
        return {"config": dump, "model": model_identity(self.cfg)}

    @cached_property
    def keys(self) -> list[str]:
        """Round K's key chains the settings, the held-out prompts, its own prompts and round K-1's key."""
        keys: list[str] = []
        for chunk in self.chunks:
            keys.append(_hash({"settings": self.settings, "held": self.held, "prompts": chunk,
                               "previous": keys[-1] if keys else None}))
        return keys

    def round_dir(self, k: int) -> RunDir:
        return RunDir(self.out / f"round-{k}")

    @property
    def summary_path(self) -> Path:
        return self.out / "iterate.json"


def chunk_prompts(train: list, rounds: int, per_round: int | None, n_held: int) -> list[list]:
    """Disjoint chunks of the (already shuffled) training prompts, one per round."""
    size = per_round or len(train) // rounds
    if size == 0 or size * rounds > len(train):
        asked = (f"iterate.prompts_per_round: {rounds} rounds x {per_round} prompts" if per_round
                 else f"iterate.rounds: {rounds} rounds of at least 1 prompt")
        raise UserError(f"{asked} need {max(size, 1) * rounds} training prompts, but there are {len(train)} (after "
                        f"pairs.eval_prompts={n_held} held out); lower iterate.prompts_per_round or iterate.rounds, "
                        "or add prompts (pairs.prompts)")
    return [train[i * size:(i + 1) * size] for i in range(rounds)]


def plan_iterate(cfg: RunConfig, out: Path) -> Iteration:
    """Every check that needs no weights, all before anything is written: LoRA, judges, prompts, folders, and the
    training plan of a round (loss, reference, precision)."""
    it = cfg.iterate
    if cfg.train.lora is None:
        raise UserError("iterate supports LoRA runs (train.lora): each round continues one adapter, so pi0 stays "
                        "the base weights; add a train.lora section (e.g. --set 'train.lora={r: 16}')")
    if cfg.train.lora.init_from or cfg.train.reference_model:
        raise UserError("train.lora.init_from / train.reference_model: dpokit iterate sets the starting adapter and "
                        "the reference itself (iterate.reference: initial or previous); remove them")
    if not cfg.eval.generate:
        raise UserError("eval.generate: dpokit iterate measures every round by sampled answers (win rate, KL); "
                        "drop eval.generate=false")
    problems = check_judge(cfg.pairs.judge, cfg.pairs.judge_options, "pairs")
    if problems:
        raise UserError("; ".join(problems))
    train, held = split_prompts(read_prompts(cfg.pairs.prompts), cfg.pairs)
    chunks = chunk_prompts(train, it.rounds, it.prompts_per_round, len(held))
    check_out_dir(out, it.rounds)
    iteration = Iteration(cfg, out, chunks, held)
    first = round_config(iteration, 1)
    first.data.source, first.data.eval_source = PLACEHOLDER_SOURCE, None  # the pairs do not exist yet
    plan_training(first, evaluate=True, origin="iterate")  # loss, reference, precision, the eval judge
    return iteration


def check_out_dir(out: Path, rounds: int) -> None:
    """DIR is iterate's own: refuse a non-empty folder without the marker, and round folders no dpokit run wrote."""
    claim_out_dir(out, "iterate", fresh=False, check_only=True)
    for name in [f"round-{k}" for k in range(1, rounds + 1)] + ["offline"]:
        run = RunDir(out / name)
        if run.exists_nonempty() and not (run.config.is_file() and run.manifest.is_file()):
            raise UserError(f"--out: {run.path} is not a dpokit run folder (no config.yaml and run.json); move it "
                            "away, or choose another --out")


def round_config(iteration: Iteration, k: int | str, init_from: Path | None = None, max_steps: int | None = None,
                 source: Path | None = None) -> RunConfig:
    """Round k's run config (k = "offline" for the offline arm): the round's pairs, the held-out pairs, the
    round's learning rate / epochs / sft weight, the adapter to continue and the reference."""
    cfg, it = iteration.cfg, iteration.cfg.iterate
    raw = cfg.model_dump(mode="json")
    name = f"round-{k}" if isinstance(k, int) else k
    raw["data"].update(source=str((source or iteration.out / "pairs" / f"{name}.jsonl").resolve()),
                       eval_source=str((iteration.out / "pairs" / "eval.jsonl").resolve()))
    t = raw["train"]
    t.update(learning_rate=it.learning_rate or t["learning_rate"], epochs=it.epochs or t["epochs"],
             sft_weight=t["sft_weight"] if it.sft_weight is None else it.sft_weight,
             # initial: pi0 = the base under the disabled adapter; previous: log-probs of the policy as it starts
             reference="adapter" if it.reference == "initial" else "precomputed")
    t["lora"]["init_from"] = str(init_from.resolve()) if init_from else None
    if max_steps is not None:
        t["max_steps"] = max_steps
    raw["eval"]["enabled"] = True
    raw["output"].update(dir=str((iteration.out / name).resolve()), overwrite=True)
    return config_from_dict(raw, f"iterate ({name})")


# --- pairs -------------------------------------------------------------------------------------------------------

def adapter_fingerprint(adapter: Path | None) -> str:
    """Identity of the sampling policy: pi0, or the adapter's weights."""
    if adapter is None:
        return "pi0"
    h = hashlib.sha256()
    for path in sorted(adapter.glob("adapter_*")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def sample_pairs(iteration: Iteration, prompts: list, adapter: Path | None, name: str, extra: dict,
                 console) -> dict:
    """pairs/NAME.jsonl: best-vs-worst pairs of `prompts` sampled by pi0 (adapter None) or pi0 + adapter, reused
    when pairs/NAME.json holds the same key (prompts, pairs settings, round, the policy's weights)."""
    cfg = iteration.cfg
    settings = pair_settings(cfg)
    key = settings_key(json.dumps(iteration.settings["model"], sort_keys=True), prompts, cfg.pairs, **settings,
                       extra={**extra, "policy": adapter_fingerprint(adapter)})
    path, meta_path = iteration.out / "pairs" / f"{name}.jsonl", iteration.out / "pairs" / f"{name}.json"
    if meta_path.is_file() and path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") == key:
            console.print(f"    pairs: reusing {path}")
            return meta["stats"]
    pairs, stats, _ = sample_best_vs_worst(cfg, prompts, console, "    sampling", adapter=adapter, transient=True)
    if not pairs:
        raise UserError(f"pairs: no pairs from {len(prompts)} prompts ({name}): every prompt's answers tied or "
                        f"differed by less than pairs.min_gap={cfg.pairs.min_gap}; lower pairs.min_gap or raise "
                        "pairs.num_samples")
    write_jsonl(path, pairs)
    atomic_write_text(meta_path, json.dumps({"key": key, "stats": stats}, indent=2))
    return stats


# --- one round ---------------------------------------------------------------------------------------------------

def train_and_evaluate(cfg: RunConfig, progress: bool, callbacks: list | None, console) -> RunDir:
    """Train into cfg.output.dir unless it already holds this config's finished run on these pairs (resuming
    from its checkpoint when it has one), then evaluate unless eval.json is there for this very training."""
    run, trained = train_unless_finished(cfg, progress=progress, callbacks=callbacks,
                                         say=lambda text: console.print(f"    {text}"))
    evaluate_unless_done(run, trained_now=trained, quiet=False, say=lambda text: console.print(f"    {text}"))
    return run


def tuned_answers(run: RunDir) -> tuple[list, list[str]]:
    samples = run.read_eval_samples()
    return [(json.dumps(s.prompt, sort_keys=True), s.sample) for s in samples], [s.tuned for s in samples]


def win_rate_against(judge, run: RunDir, other: RunDir | None) -> dict:
    """Win rate of run's tuned answers over other's tuned answers (other None: over run's own base answers, pi0):
    the same held-out prompts, seeds and decoding, so only the policy differs."""
    ids, tuned = tuned_answers(run)
    samples = run.read_eval_samples()
    if other is None:
        against = [s.base for s in samples]
    else:
        other_ids, against = tuned_answers(other)
        if other_ids != ids:
            raise UserError(f"{run.path} and {other.path} answered different held-out prompts; re-run both rounds "
                            "with the same eval settings")
    cmp = judge_pairs(judge, [s.prompt for s in samples], tuned, against)
    return outcome_summary(cmp.outcomes).win_rate


def mean_distinct_2(texts: list[str]) -> float | None:
    scores = [d for d in (distinct_n(u, 2) for u in answer_units(texts)) if d is not None]
    return sum(scores) / len(scores) if scores else None


def run_record(run: RunDir, judge, previous: RunDir | None, *, label, seconds: float) -> dict:
    """One entry of iterate.json from a finished, evaluated run folder."""
    ev, summary = run.read_eval(), run.read_train_summary()
    gen, kl = ev.generation, ev.kl
    vs_prev = win_rate_against(judge, run, previous) if label != "offline" else None
    score = gen.scores.tuned if gen.scores else None
    lc = gen.length_controlled.win_rate
    return {
        "round": label if label != "offline" else None,
        "win_rate_vs_initial": gen.outcomes.win_rate.value, "win_rate_vs_initial_ci": gen.outcomes.win_rate.ci,
        "lc_win_rate_vs_initial": lc.value if lc else None, "lc_win_rate_vs_initial_ci": lc.ci if lc else None,
        "win_rate_vs_previous": vs_prev.value if vs_prev else None,
        "win_rate_vs_previous_ci": vs_prev.ci if vs_prev else None,
        "kl_from_initial": kl.sequence.value, "kl_from_initial_ci": kl.sequence.ci,
        "mean_score": score.value if score else None, "mean_score_ci": score.ci if score else None,
        "mean_length": gen.lengths.tuned.mean.value,
        "distinct_2": mean_distinct_2([s.tuned for s in run.read_eval_samples()]),
        "pairs": summary.pairs_trained, "steps": summary.global_step, "reference": summary.reference,
        "step0_check": summary.step0_check.policy_equals_reference if summary.step0_check else None,
        "resumed_from": summary.resumed_from, "seconds": round(seconds, 1), "run_dir": str(run.path),
    }


def initial_record(run: RunDir) -> dict:
    """pi0 itself, from round 1's base answers: KL 0 and a win rate of 1/2 against itself by definition."""
    ev = run.read_eval()
    gen = ev.generation
    score = gen.scores.base if gen.scores else None
    return {"mean_score": score.value if score else None, "mean_score_ci": score.ci if score else None,
            "mean_length": gen.lengths.base.mean.value,
            "distinct_2": mean_distinct_2([s.base for s in run.read_eval_samples()]), "kl_from_initial": 0.0}


# --- the loop ----------------------------------------------------------------------------------------------------

def read_summary(iteration: Iteration) -> dict:
    """Finished rounds of an earlier, interrupted run of these settings; a round of other settings is an error."""
    path = iteration.summary_path
    if not path.is_file():
        return {"rounds": []}
    summary = parse_artifact(IterateSummary, path).model_dump(mode="json")
    kept = []
    for row in summary.get("rounds", []):
        k = row["round"]
        if k > len(iteration.keys):  # fewer rounds asked this time: the later ones are left out of the summary
            continue
        if row.get("key") != iteration.keys[k - 1]:
            raise UserError(f"--out: {iteration.out}: round {k} was run with other settings (config, prompts or an "
                            "earlier round differ); choose another --out, or pass --fresh to start over")
        if iteration.round_dir(k).read_eval() is not None:
            kept.append(row)
    summary["rounds"] = kept
    return summary


def write_summary(iteration: Iteration, summary: dict) -> None:
    """iterate.json, checked against `IterateSummary` on the way out (a wrong key fails here, not at the next read)."""
    typed = IterateSummary.model_validate(summary)
    atomic_write_text(iteration.summary_path, typed.model_dump_json(indent=2))


def run_rounds(iteration: Iteration, summary: dict, judge, progress: bool, callbacks: dict, console) -> None:
    cfg = iteration.cfg
    done = {row["round"] for row in summary["rounds"]}
    for k, chunk in enumerate(iteration.chunks, start=1):
        run = iteration.round_dir(k)
        if k in done:
            console.print(f"round {k}/{len(iteration.chunks)}: done ({run.path}), kept")
            continue
        began = time.time()
        previous = iteration.round_dir(k - 1) if k > 1 else None
        adapter = previous.model_dir if previous else None
        console.print(f"round {k}/{len(iteration.chunks)}: sampling {len(chunk)} prompts x {cfg.pairs.num_samples} "
                      f"answers with {'pi0' if previous is None else 'the round-' + str(k - 1) + ' policy'}")
        stats = sample_pairs(iteration, chunk, adapter, f"round-{k}", {"round": k}, console)
        console.print(f"    {stats['pairs']} pairs from {stats['prompts']} prompts")
        round_cfg = round_config(iteration, k, init_from=adapter)
        train_and_evaluate(round_cfg, progress, callbacks.get(f"round-{k}"), console)
        row = run_record(run, judge, previous, label=k, seconds=time.time() - began)
        row.update(key=iteration.keys[k - 1], prompts=len(chunk))
        summary["rounds"].append(row)
        if k == 1:
            summary["initial"] = initial_record(run)
        write_summary(iteration, summary)
        console.print(f"    win rate vs pi0 {row['win_rate_vs_initial']:.3f}, vs previous "
                      f"{row['win_rate_vs_previous']:.3f}, KL {row['kl_from_initial']:.2f} nats")


def run_offline(iteration: Iteration, summary: dict, judge, progress: bool, callbacks: dict, console) -> None:
    """The offline arm: every round's prompts answered by pi0 (round 1's pairs are already that; the others are
    sampled now), one run from a fresh adapter for the rounds' total optimizer steps."""
    steps = sum(row["steps"] for row in summary["rounds"])
    began = time.time()
    rest = [p for chunk in iteration.chunks[1:] for p in chunk]
    console.print(f"offline arm: {len(rest)} more prompts answered by pi0, then {steps} steps from pi0")
    pairs = read_jsonl(iteration.out / "pairs" / "round-1.jsonl")
    if rest:
        sample_pairs(iteration, rest, None, "offline-pi0", {"offline": True}, console)
        pairs += read_jsonl(iteration.out / "pairs" / "offline-pi0.jsonl")
    source = iteration.out / "pairs" / "offline.jsonl"
    if not source.is_file() or read_jsonl(source) != pairs:
        write_jsonl(source, pairs)
    cfg = round_config(iteration, "offline", max_steps=steps, source=source)
    run = train_and_evaluate(cfg, progress, callbacks.get("offline"), console)
    row = run_record(run, judge, None, label="offline", seconds=time.time() - began)
    row.update(prompts=sum(len(c) for c in iteration.chunks))
    last = iteration.round_dir(len(iteration.chunks))
    summary["offline"] = row
    rate = win_rate_against(judge, last, run)
    summary["last_round_vs_offline"] = {"win_rate": rate.value, "win_rate_ci": rate.ci}
    write_summary(iteration, summary)


def held_out_pairs(iteration: Iteration, console) -> None:
    console.print(f"held-out pairs: {len(iteration.held)} prompts x {iteration.cfg.pairs.num_samples} answers "
                  "from pi0 (once, for every round)")
    stats = sample_pairs(iteration, iteration.held, None, "eval", {"held_out": True}, console)
    console.print(f"    {stats['pairs']} held-out pairs")


def run_iterate(out: str | Path = "runs/iterate", *, config: str | Path | None = None,
                overrides: list[str] | None = None, fresh: bool = False, progress: bool = False,
                console: Console | None = None, callbacks: dict[str, list] | None = None) -> dict:
    """Every round (and, with iterate.compare_offline, the offline arm); returns iterate.json's content.

    `callbacks`: extra TrainerCallbacks by run name ("round-2", "offline"); the tests stop a round with one.
    `progress`: print each round's training lines too."""
    start = time.time()
    console = console or Console(quiet=True)
    out = Path(out).expanduser()
    cfg = load_iterate_config(config, overrides)
    iteration = plan_iterate(cfg, out)  # every input is checked before anything is written
    if fresh and out.is_dir():
        console.print(f"--fresh: removing {out}")
    claim_out_dir(out, "iterate", fresh=fresh)
    summary = read_summary(iteration)
    summary.update(schema_version=SCHEMA_VERSION, model=cfg.model.name_or_path, judge=cfg.eval.judge,
                   reference=cfg.iterate.reference, rounds_planned=len(iteration.chunks),
                   held_out_prompts=len(iteration.held), config=cfg.model_dump(mode="json"))
    summary["offline"] = None  # recomputed below when asked (a finished offline run is kept, not retrained)
    summary.pop("last_round_vs_offline", None)
    judge = build_judge(cfg.eval.judge, cfg.eval.judge_options)
    held_out_pairs(iteration, console)
    run_rounds(iteration, summary, judge, progress, callbacks or {}, console)
    if cfg.iterate.compare_offline:
        run_offline(iteration, summary, judge, progress, callbacks or {}, console)
    last = iteration.round_dir(len(iteration.chunks))
    said, direction = run_verdict(last.path)  # the last round vs pi0, by the judge: what the summary leads with
    summary["verdict"], summary["outcome"] = f"Last round vs pi0: {said}", direction
    summary["wall_seconds"] = round(time.time() - start, 1)
    write_summary(iteration, summary)
    summary["report"] = str(write_iterate_report(out, summary))
    write_summary(iteration, summary)
    return summary


def format_table(summary: dict) -> str:
    """The closing table: pi0, each round and the offline arm, with the 95% intervals."""
    cell = format_interval

    header = ["", "win rate vs pi0 [95% CI]", "length-controlled", "vs previous", "mean score", "KL from pi0",
              "length", "distinct-2", "pairs", "steps"]
    init = summary.get("initial") or {}
    body = [["pi0", "0.500", "0.500", "-", cell(init.get("mean_score")), "0", cell(init.get("mean_length"), digits=1),
             cell(init.get("distinct_2")), "-", "-"]] if init else []
    rows = [(f"round {r['round']}", r) for r in summary["rounds"]]
    if summary.get("offline"):
        rows.append(("offline", summary["offline"]))
    for label, r in rows:
        body.append([label, cell(r["win_rate_vs_initial"], r["win_rate_vs_initial_ci"]),
                     cell(r.get("lc_win_rate_vs_initial"), r.get("lc_win_rate_vs_initial_ci")),
                     cell(r["win_rate_vs_previous"]), cell(r["mean_score"]), cell(r["kl_from_initial"], digits=2),
                     cell(r["mean_length"], digits=1), cell(r["distinct_2"]), str(r["pairs"]), str(r["steps"])])
    lines = render_table(header, body).splitlines()
    if summary.get("verdict"):
        lines.insert(0, summary["verdict"])  # the outcome first
    vs = summary.get("last_round_vs_offline")
    if vs:
        lines.append(f"last round vs offline arm, win rate: {cell(vs['win_rate'], vs['win_rate_ci'])}")
    return "\n".join(lines)
