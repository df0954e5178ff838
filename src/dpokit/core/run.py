"""The run folder: one owner for every path in it, and every artifact as a typed model.

`RunDir(path)` names each file of a run folder and reads or writes it through a pydantic model, so train, eval,
report, export, sweep and quickstart agree on one contract instead of string literals and untyped dicts. Every JSON
artifact carries `schema_version`; JSONL artifacts are versioned by the run's manifest (`run.json`). Reading an
artifact of another version fails with one line saying so. `ARTIFACTS` documents the folder; the README's
"Run folder" and `eval.json` tables are generated from these models (tests/test_docs.py checks them).

Writes are atomic (temporary file + rename); only the main process of a distributed run writes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dpokit import __version__
from dpokit.core.config import RunConfig, config_from_dict
from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text, read_jsonl, write_jsonl

SCHEMA_VERSION = 1


class Model(BaseModel):
    # Tolerant of keys added by later minor versions; the schema_version says when a reader must refuse.
    model_config = ConfigDict(extra="allow")


class Artifact(Model):
    schema_version: int = Field(SCHEMA_VERSION, description="Version of this file's layout.")


# --- metrics -----------------------------------------------------------------------------------------------------

class Metric(Model):
    """A number with its 95% interval: proportions use Wilson's interval, means the normal interval of the mean."""

    value: float | None
    ci: list[float | None] = Field(description="[low, high] of the 95% interval")
    n: int | None = None


# --- data --------------------------------------------------------------------------------------------------------

class DataReport(Artifact):
    source: str = Field(description="where the pairs came from (file, folder or hub id)")
    format: str = Field(description="the detected or forced row shape (`data.format`)")
    kind: Literal["text", "conversational"] = Field(description="plain-text or message rows")
    n_train: int = Field(description="pairs in `data/train.jsonl`: exactly the pairs trained on")
    n_eval: int = Field(description="held-out pairs in `data/eval.jsonl`")
    train_counts: dict[str, Any] = Field(description="rows read, malformed, dropped by the format and why, kept")
    eval_counts: dict[str, Any] | None = None
    split: dict[str, Any] = Field(description="how the held-out pairs were chosen")
    checks: dict[str, Any] = Field(description="empty fields, duplicates, prompts shared by train and eval")
    train_tokenization: dict[str, Any] | None = Field(None, description="token lengths, truncation, pairs dropped "
                                                      "over data.max_length, length bias, template checks")
    eval_tokenization: dict[str, Any] | None = None


# --- training ----------------------------------------------------------------------------------------------------

class ReferenceEvalLogps(Artifact):
    """The reference's log-probs of the held-out pairs, from training's precompute (`train.reference:
    precomputed`), so evaluation can reuse them from the run folder instead of a second forward pass."""

    pairs_fingerprint: str = Field(description="hash of the held-out pairs' token ids (`pairs_fingerprint`)")
    chosen: list[float] = Field(description="summed log-prob of each held-out chosen response, in file order")
    rejected: list[float] = Field(description="summed log-prob of each held-out rejected response")


class MetricsRow(Model):
    """One logged step of `metrics.jsonl` (also every metric transformers.Trainer logs)."""

    step: int
    epoch: float | None = None
    loss: float | None = None


class TrainSummary(Artifact):
    metrics: dict[str, Any] = Field(description="final training metrics from transformers.Trainer")
    wall_seconds: float = Field(description="training wall time, model loading included")
    global_step: int = Field(description="optimizer steps taken")
    reference: str = Field(description="the reference actually used: model, adapter, precomputed or none")
    engine: str = Field(description="native or trl")
    reference_forwards: dict[str, Any] = Field(description="reference forward passes: `precompute`, `training`")
    reference_cache: dict[str, Any] | None = Field(None, description="precomputed reference log-probs: cache hit "
                                                   "or miss, key")
    step0_check: dict[str, Any] | None = Field(None, description="at step 0 the DPO loss must be ln 2 (policy equals "
                                               "reference)")
    pairs_trained: int | None = Field(None, description="pairs in the training set after truncation")
    precision: str | None = Field(None, description="fp32, bf16 or fp16: what training ran in")
    attention: dict[str, Any] | None = Field(None, description="`backend`: the attention of training batches after "
                                             "the start-up self-check (varlen, flex, dense, or padded); "
                                             "`passed_over`: each backend tried first and why it was not used")
    versions: dict[str, str] | None = Field(None, description="dpokit, torch, transformers, peft, python versions")
    finished: float | None = Field(None, description="unix time training finished")
    resumed_from: str | None = Field(None, description="the checkpoint a --resume continued from (its folder name)")
    distributed: dict[str, Any] | None = Field(
        None, description="the strategy training actually used: `type` (none, ddp, fsdp, deepspeed), `processes`, "
        "`machines`, `sharded` (parameters, gradients or optimizer state split over the processes), `parameters` "
        "(`full`, and `per_rank`: the elements each rank held), `zero_stage` (DeepSpeed)")


# --- evaluation --------------------------------------------------------------------------------------------------

class LikelihoodAccuracy(Model):
    sum: Metric
    mean_per_token: Metric


class PreferenceMetrics(Model):
    n_pairs: int = Field(description="held-out pairs scored")
    implicit_reward_accuracy: Metric = Field(
        description="share of pairs where `beta * (log pi_tuned(y\\|x) - log pi_base(y\\|x))` ranks chosen above "
        "rejected")
    reward_margin: Metric = Field(description="mean implicit-reward margin (chosen - rejected)")
    likelihood_accuracy: dict[str, LikelihoodAccuracy] = Field(
        description="`base`, `tuned`: share of pairs where the model gives the chosen response a higher "
        "log-probability, summed (`sum`) or per token (`mean_per_token`)")


class Outcomes(Model):
    n: int
    wins: int
    ties: int
    losses: int
    unparseable: int
    win: Metric
    tie: Metric
    loss: Metric
    win_rate: Metric


class LengthBucket(Model):
    bucket: str
    n: int
    wins: int
    ties: int
    losses: int
    unparseable: int
    win_rate: Metric


class LengthControlled(Model):
    tolerance: float
    buckets: list[LengthBucket] = Field(
        description="win/tie/loss and `win_rate` within `tuned_shorter`, `length_matched` (lengths within "
        "`eval.length_tolerance` of the longer answer), `tuned_longer`: a win rate that holds among length-matched "
        "pairs is not verbosity")
    regression: dict[str, Any] | None = Field(
        description="pointwise judges: OLS `score ~ 1 + length_tokens + is_tuned`; `tuned_effect` is the score gain "
        "at equal length, `per_token` the score per extra token (`null` if degenerate)")


class Generation(Model):
    n_prompts: int = Field(description="held-out prompts answered")
    samples_per_prompt: int = Field(description="answers per prompt and model")
    n_samples: int = Field(description="answers per model")
    decoding: dict[str, Any] = Field(description="temperature, top_p, max_new_tokens, seed")
    judge: dict[str, Any] = Field(
        description="`name`, `kind` (pointwise or pairwise), `details` (llm judge: answers asked, unparseable "
        "answers, pairs consistent / inconsistent across the two orders, how often each position was picked)")
    outcomes: Outcomes = Field(
        description="tuned vs base: counts `wins`, `ties`, `losses`, `unparseable` (left out of every rate), `n` "
        "(judged pairs); rates `win`, `tie`, `loss`; `win_rate` (a tie counts 1/2)")
    scores: dict[str, Any] | None = Field(
        description="pointwise judges: mean judge score `base` and `tuned`, and all values (`base_values`, "
        "`tuned_values`); `null` for pairwise judges")
    lengths: dict[str, Any] = Field(
        description="answer lengths in tokens: `histogram_edges` (shared), and per model `mean`, `median`, `min`, "
        "`max`, `histogram`, `values`")
    length_controlled: LengthControlled


class KL(Model):
    n_samples: int
    total_tokens: int
    sequence: Metric = Field(description="mean over the tuned model's samples y of `log pi_tuned(y\\|x) - log "
                             "pi_base(y\\|x)` (nats per answer)")
    per_token: Metric = Field(description="total log-ratio / total sampled tokens (`total_tokens`), delta-method "
                              "interval")
    exact_sampling: bool = Field(description="true when `temperature` is 1 and `top_p` is 1; otherwise the samples "
                                 "are not exactly from pi_tuned and the estimate is biased")


class EvalResult(Artifact):
    run_dir: str
    model: str = Field(description="the base model")
    beta: float = Field(description="train.beta, the scale of the implicit reward")
    settings: dict[str, Any] | None = Field(None, description="the `eval` config section used for this evaluation "
                                            "(after any `dpokit eval --set eval.KEY=VALUE`)")
    preference: PreferenceMetrics
    generation: Generation | None = Field(None, description="judged answers of tuned vs base (`null` with "
                                          "eval.generate: false)")
    kl: KL | None = Field(None, description="KL(tuned || base) on the tuned model's own samples")
    ranking: dict[str, Any] | None = Field(None, description="ranked held-out lists: pairwise accuracy and Kendall "
                                           "tau of the implicit rewards against the given order (`null` for pairs)")
    unpaired: dict[str, Any] | None = Field(None, description="unpaired held-out rows (KTO): share of desirable "
                                            "answers the tuned model raised and undesirable ones it lowered")


class EvalSample(Model):
    """One row of `eval_samples.jsonl`: a tuned and a base answer to the same prompt with the same seed."""

    prompt: Any
    sample: int
    base: str
    tuned: str
    base_tokens: int
    tuned_tokens: int
    outcome: int | None
    base_score: float | None = None
    tuned_score: float | None = None
    kl_sequence: float


class RunManifest(Artifact):
    dpokit_version: str = Field(description="the dpokit that wrote the folder")
    created: float = Field(description="unix time the folder was written")


# --- the folder --------------------------------------------------------------------------------------------------

# (path in the run folder, what it holds): the README's "Run folder" table is generated from this.
ARTIFACTS: list[tuple[str, str]] = [
    ("run.json", "manifest: `schema_version` of the folder's layout, the dpokit version that wrote it"),
    ("config.yaml", "the resolved run config (every default filled in), plus `schema_version`"),
    ("data/train.jsonl", "the canonical pairs trained on, exactly (after `data.truncation: drop`)"),
    ("data/eval.jsonl", "the held-out canonical pairs"),
    ("data/report.json", "the data report (`DataReport`): counts, drops, checks, token lengths"),
    ("metrics.jsonl", "one JSON row per logged step: `loss`, `rewards/chosen`, `rewards/rejected`, "
                      "`rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, `learning_rate`, "
                      "`grad_norm`"),
    ("checkpoints/checkpoint-N/", "Trainer checkpoints (`train.save_steps`); `--resume` continues the last "
                                  "complete one"),
    ("model/", "the final model (safetensors) or LoRA adapter, and the tokenizer with the chat template used"),
    ("training_args.json", "the arguments that reached transformers.Trainer (JSON, not pickle)"),
    ("data/reference_eval_logps.json", "`train.reference: precomputed`: the reference's log-probs of the held-out "
                                       "pairs (`ReferenceEvalLogps`), reused by evaluation"),
    ("train_summary.json", "final training metrics, wall time, reference used, step-0 check (`TrainSummary`)"),
    ("eval.json", "evaluation results (`EvalResult`, see below)"),
    ("eval_samples.jsonl", "one row per answer pair: prompt, base, tuned, token counts, judge scores, outcome, "
                           "per-sample log-ratio"),
    ("report.html", "`dpokit report`: self-contained HTML report; `report.md` and `report_plots/` beside it"),
]


def _check_version(raw: Any, path: Path) -> None:
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version is not None and version != SCHEMA_VERSION:
        raise UserError(f"{path}: schema_version {version}, but this dpokit reads version {SCHEMA_VERSION}; use the "
                        "dpokit that wrote this run, or re-run that stage with this one")


def _parse(model: type[Model], raw: Any, path: Path) -> Any:
    _check_version(raw, path)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: not a valid {model.__name__} ({where}: {first['msg']}); the file was changed by "
                        "hand or by another tool: re-run the stage that writes it") from None


def _dump(model: Model) -> str:
    # json, not model_dump_json: keeps NaN as NaN (an interval of one value), as the files always had it.
    return json.dumps(model.model_dump(mode="python"), indent=2, ensure_ascii=False)


class RunDir:
    """A run folder. Paths are properties; `read_*` / `write_*` go through the artifact models."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # paths
    manifest = property(lambda self: self.path / "run.json")
    config = property(lambda self: self.path / "config.yaml")
    data_dir = property(lambda self: self.path / "data")
    train_pairs = property(lambda self: self.path / "data" / "train.jsonl")
    eval_pairs = property(lambda self: self.path / "data" / "eval.jsonl")
    data_report = property(lambda self: self.path / "data" / "report.json")
    reference_eval_logps = property(lambda self: self.path / "data" / "reference_eval_logps.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    model_dir = property(lambda self: self.path / "model")
    training_args = property(lambda self: self.path / "training_args.json")
    train_summary = property(lambda self: self.path / "train_summary.json")
    eval_result = property(lambda self: self.path / "eval.json")
    eval_samples = property(lambda self: self.path / "eval_samples.jsonl")
    report_html = property(lambda self: self.path / "report.html")

    # state
    def exists_nonempty(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def has_model(self) -> bool:
        return self.model_dir.is_dir()

    def is_adapter(self) -> bool:
        return (self.model_dir / "adapter_config.json").is_file()

    def require_run(self) -> None:
        """A folder written by `dpokit train` (config.yaml present)."""
        if not self.config.is_file():
            raise UserError(f"{self.path}: not a dpokit run folder (no config.yaml); pass the output.dir of a "
                            "training run")
        if self.manifest.is_file():
            _check_version(json.loads(self.manifest.read_text(encoding="utf-8")), self.manifest)

    def require_model(self) -> None:
        self.require_run()
        if not self.has_model():
            raise UserError(f"{self.path}: no trained model in {self.model_dir}; finish (or --resume) training first")

    # writing a new run
    def create(self, cfg: RunConfig, *, replace: bool) -> None:
        """Start the folder: (replace: delete what is there first), manifest and config."""
        if replace and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.manifest, _dump(RunManifest(dpokit_version=__version__, created=time.time())))
        self.write_config(cfg)

    # config
    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.config, yaml.safe_dump({"schema_version": SCHEMA_VERSION, **cfg.model_dump(mode="json")},
                                                      sort_keys=False))

    def read_config(self) -> RunConfig:
        self.require_run()
        raw = yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}
        _check_version(raw, self.config)
        raw.pop("schema_version", None)
        return config_from_dict(raw, str(self.config))

    # data
    def write_data(self, train: list[dict], evals: list[dict], report: DataReport) -> None:
        write_jsonl(self.train_pairs, train)
        write_jsonl(self.eval_pairs, evals)
        atomic_write_text(self.data_report, _dump(report))

    def read_eval_pairs(self) -> list[dict]:
        return read_jsonl(self.eval_pairs) if self.eval_pairs.is_file() else []

    def read_train_pairs(self) -> list[dict]:
        return read_jsonl(self.train_pairs) if self.train_pairs.is_file() else []

    def read_data_report(self) -> DataReport | None:
        return self._read_json(DataReport, self.data_report)

    def write_reference_eval_logps(self, logps: ReferenceEvalLogps) -> None:
        atomic_write_text(self.reference_eval_logps, _dump(logps))

    def read_reference_eval_logps(self) -> ReferenceEvalLogps | None:
        return self._read_json(ReferenceEvalLogps, self.reference_eval_logps)

    # training
    def read_metrics(self) -> list[MetricsRow]:
        if not self.metrics.is_file():
            return []
        return [_parse(MetricsRow, row, self.metrics) for row in read_jsonl(self.metrics)]

    def write_train_summary(self, summary: TrainSummary) -> None:
        atomic_write_text(self.train_summary, _dump(summary))

    def read_train_summary(self) -> TrainSummary | None:
        return self._read_json(TrainSummary, self.train_summary)

    def write_training_args(self, args_json: str) -> None:
        atomic_write_text(self.training_args, args_json)

    # evaluation
    def write_eval(self, result: EvalResult, samples: list[EvalSample]) -> None:
        write_jsonl(self.eval_samples, [s.model_dump(mode="python") for s in samples])
        atomic_write_text(self.eval_result, _dump(result))

    def read_eval(self) -> EvalResult | None:
        return self._read_json(EvalResult, self.eval_result)

    def require_eval(self) -> EvalResult:
        self.require_run()
        result = self.read_eval()
        if result is None:
            raise UserError(f"{self.path}: no eval.json; run `dpokit eval {self.path}` first")
        return result

    def read_eval_samples(self) -> list[EvalSample]:
        if not self.eval_samples.is_file():
            return []
        return [_parse(EvalSample, row, self.eval_samples) for row in read_jsonl(self.eval_samples)]

    def _read_json(self, model: type[Model], path: Path):
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON (line {err.lineno}: {err.msg}); re-run the stage that writes "
                            "it") from None
        return _parse(model, raw, path)


def describe_artifact_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, description) for every documented field, depth first: the README's `eval.json` table."""
    rows = []
    for name, field in model.model_fields.items():
        if name == "schema_version":
            continue
        key = f"{prefix}{name}"
        if field.description:
            rows.append((key, field.description))
        ann = field.annotation
        sub = next((c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type) and issubclass(c, BaseModel)
                    and c is not Metric), None)
        if sub is not None:
            rows.extend(describe_artifact_keys(sub, key + "."))
    return rows


def markdown_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{key}` | {text} |" for key, text in rows]
    return "\n".join(lines)


def readme_tables() -> dict[str, str]:
    """The README's generated tables, by the heading they sit under."""
    return {"run_folder": markdown_table(("path", "what"), ARTIFACTS),
            "eval_json": markdown_table(("key", "meaning"), describe_artifact_keys(EvalResult))}
