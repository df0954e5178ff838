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
from dpokit.core.config import EvalConfig, RunConfig, config_from_dict
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


def format_interval(value: float | None, ci: list | None = None, digits: int = 3) -> str:
    """"0.912 [0.851, 0.953]": a value with its interval, the one spelling every summary and table uses; "-" for
    a value that was not measured."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


# --- data --------------------------------------------------------------------------------------------------------

# A row's fields as the user wrote them (shortened), with `where` (file:line): user data, so no fixed shape.
Preview = dict[str, Any]
# A prompt as the data has it: text, or chat messages ({"role", "content"}, content parts as the model's chat
# template reads them, e.g. {"type": "image"}): the template's schema, not dpokit's, so messages stay dicts.
UserPrompt = str | list[dict[str, Any]]


class Examples(Model):
    """A count plus the first few examples (`dpokit.data.checks.MAX_EXAMPLES`)."""

    count: int
    examples: list[Preview] = Field(default_factory=list)


class Malformed(Examples):
    by_kind: dict[str, int] = Field(description="malformed rows by kind: invalid_json, missing fields, ...")


class ReadCounts(Model):
    rows_in: int = Field(description="rows read")
    malformed: Malformed = Field(description="rows that could not be read as the format (skipped or an error)")
    dropped_by_format: dict[str, Examples] = Field(description="rows the format drops, by reason")
    identical_pairs_dropped: Examples = Field(description="pairs whose chosen equals rejected")
    rows_out: int = Field(description="rows kept")


class Split(Model):
    how: Literal["by_prompt", "none", "eval_source", "eval_split"]
    eval_fraction: float | None = None
    seed: int | None = None


class LabelCounts(Model):
    desirable: int
    undesirable: int


class RowChecks(Model):
    """Reported, not dropped. Pairs have `duplicate_pairs`; ranked and unpaired rows `duplicate_rows`; ranked
    rows also `tied_scores`, `repeated_responses`, `responses_per_row`; unpaired rows `labels`."""

    empty_fields: dict[str, Examples]
    duplicate_pairs: Examples | None = None
    duplicate_rows: Examples | None = None
    tied_scores: Examples | None = None
    repeated_responses: Examples | None = None
    responses_per_row: dict[str, int] | None = None
    labels: LabelCounts | None = None


class SharedPrompts(Model):
    eval_pairs: int = Field(description="held-out rows whose prompt is also a training prompt")
    distinct_prompts: int
    examples: list[Preview]


class DataChecks(Model):
    train: RowChecks
    eval: RowChecks
    prompts_shared_train_eval: SharedPrompts


class OverMaxLength(Examples):
    max_length: int
    max_prompt_length: int | None
    truncation: str = Field(description="`data.truncation`: prompt_left, drop or error")
    action: str | None = Field(None, description="what that truncation does, in words")


class LengthBias(Model):
    """Mean token lengths (templated, EOS included): chosen vs rejected for pairs, by rank for lists, by label for
    unpaired rows."""

    chosen_mean_tokens: float | None = None
    rejected_mean_tokens: float | None = None
    chosen_longer_fraction: float | None = None
    mean_tokens_by_rank: dict[str, float | None] | None = None
    best_longer_than_worst_fraction: float | None = None
    desirable_mean_tokens: float | None = None
    undesirable_mean_tokens: float | None = None


class TemplateChecks(Model):
    rows_checked: int
    double_bos: int
    eos_per_response: int
    boundary_merges_handled: int = Field(description="prompt/response boundaries whose tokens merge (handled)")


class Tokenization(Model):
    pairs: int | None = Field(None, description="pairs encoded (pair data)")
    rows: int | None = Field(None, description="rows encoded (ranked or unpaired data)")
    dropped_over_max_length: int
    truncated: int
    over_max_length: OverMaxLength
    length_bias: LengthBias
    template_checks: TemplateChecks


class DataReport(Artifact):
    source: str = Field(description="where the pairs came from (file, folder or hub id)")
    format: str = Field(description="the detected or forced row shape (`data.format`)")
    kind: Literal["text", "conversational"] = Field(description="plain-text or message rows")
    feedback: Literal["pair", "ranked", "unpaired"] = Field("pair", description="the feedback kind of the rows")
    n_train: int = Field(description="pairs in `data/train.jsonl`: exactly the pairs trained on")
    n_eval: int = Field(description="held-out pairs in `data/eval.jsonl`")
    train_counts: ReadCounts = Field(description="rows read, malformed, dropped by the format and why, kept")
    eval_counts: ReadCounts | None = None
    split: Split = Field(description="how the held-out pairs were chosen")
    checks: DataChecks = Field(description="empty fields, duplicates, prompts shared by train and eval")
    train_tokenization: Tokenization | None = Field(None, description="token lengths, truncation, pairs dropped "
                                                    "over data.max_length, length bias, template checks")
    eval_tokenization: Tokenization | None = None
    tokenizer: str | None = Field(None, description="`dpokit data prepare`: the tokenizer that counted tokens")
    files: list[str] | None = Field(None, description="`dpokit data prepare`: the files written")


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


class ReferenceForwards(Model):
    precompute: int = Field(description="reference forward passes of the precompute (0 on a cache hit)")
    training: int | None = Field(description="reference forward passes during training (0 with precomputed "
                                 "log-probs; None: another engine)")


class ReferenceCache(Model):
    cache: Literal["hit", "miss"] = Field(description="whether the precomputed log-probs came from the cache")
    forwards: int = Field(description="reference forward passes this process did")
    processes: int | None = Field(None, description="processes that split the precompute (on a miss)")
    path: str = Field(description="the cache file (<dpokit cache>/reference_logps/<key>.json)")


class Step0Check(Model):
    sigmoid_loss: float = Field(description="the sigmoid DPO loss of the first batch")
    ln2: float = Field(description="ln 2: that loss when the policy equals the reference")
    tolerance: float
    policy_equals_reference: bool


class AttentionChoice(Model):
    backend: str = Field(description="the attention of training batches: varlen, flex, dense or padded")
    passed_over: dict[str, str] = Field(description="each backend tried first and why it was not used")


class ParameterCounts(Model):
    full: int = Field(description="parameters of the whole model")
    per_rank: list[int | None] = Field(description="parameter elements each rank held")


class DistributedSummary(Model):
    type: Literal["none", "ddp", "fsdp", "deepspeed"]
    processes: int
    machines: int
    sharded: bool = Field(description="parameters, gradients or optimizer state split over the processes")
    parameters: ParameterCounts
    zero_stage: int | None = Field(None, description="DeepSpeed's ZeRO stage")


class TrainSummary(Artifact):
    metrics: dict[str, float | int | None] = Field(description="final training metrics from transformers.Trainer")
    wall_seconds: float = Field(description="training wall time, model loading included")
    global_step: int = Field(description="optimizer steps taken")
    reference: str = Field(description="the reference actually used: model, adapter, precomputed or none")
    engine: str = Field(description="native or trl")
    reference_forwards: ReferenceForwards = Field(description="reference forward passes: `precompute`, `training`")
    reference_cache: ReferenceCache | None = Field(None, description="precomputed reference log-probs: cache hit "
                                                   "or miss, file")
    step0_check: Step0Check | None = Field(None, description="at step 0 the DPO loss must be ln 2 (policy equals "
                                           "reference)")
    pairs_trained: int | None = Field(None, description="pairs in the training set after truncation")
    precision: str | None = Field(None, description="fp32, bf16 or fp16: what training ran in")
    attention: AttentionChoice | None = Field(None, description="`backend`: the attention of training batches "
                                              "after the start-up self-check (varlen, flex, dense, or padded); "
                                              "`passed_over`: each backend tried first and why it was not used")
    versions: dict[str, str] | None = Field(None, description="dpokit, torch, transformers, peft, python versions")
    finished: float | None = Field(None, description="unix time training finished")
    resumed_from: str | None = Field(None, description="the checkpoint a --resume continued from (its folder name)")
    select: str | None = Field(None, description="`train.select` as resolved: best_judge or last")
    kept_step: int | None = Field(None, description="best_judge: the optimizer step whose weights are `model/` "
                                  "(selection.json has every evaluated point)")
    selection_seconds: float | None = Field(None, description="best_judge: wall time the selection took (base "
                                            "answers and every point), inside `wall_seconds`")
    distributed: DistributedSummary | None = Field(
        None, description="the strategy training actually used: `type` (none, ddp, fsdp, deepspeed), `processes`, "
        "`machines`, `sharded` (parameters, gradients or optimizer state split over the processes), `parameters` "
        "(`full`, and `per_rank`: the elements each rank held), `zero_stage` (DeepSpeed)")


class Decoding(Model):
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    engine: str | None = None


class SelectionPoint(Model):
    """One evaluated point of the training path (`train.select: best_judge`, dpokit.train.select)."""

    step: int = Field(description="optimizer step of the evaluated weights")
    epoch: float | None = Field(None, description="epoch at that step")
    outcomes: dict[str, int] = Field(description="`wins`, `ties`, `losses`, `unparseable` of this point's answers "
                                     "against the base answers")
    win_rate: Metric = Field(description="win rate vs the base (a tie counts 1/2), Wilson 95% interval: the "
                             "selection criterion is its lower bound")
    mean_score: Metric | None = Field(None, description="pointwise judges: mean judge score of this point's answers")
    kl: Metric | None = Field(None, description="KL(point || base) per answer on this point's own samples (nats); "
                              "`null` when the base is not in memory (full fine-tune with a precomputed or other "
                              "reference)")
    mean_tokens: float = Field(description="mean answer length (tokens)")
    seconds: float = Field(description="wall time of this point's sampling, judging and KL")


class Selection(Artifact):
    """`selection.json`: the checkpoints evaluated during training and the one kept as the run's model."""

    select: str = Field(description="`train.select` as resolved: best_judge")
    criterion: str = Field(description="how the kept point was chosen")
    judge: str = Field(description="the judge (eval.judge)")
    prompts: list[UserPrompt] = Field(description="the held-out prompts answered at every point")
    overlap_with_eval_prompts: int = Field(description="of those, prompts the final evaluation (eval.num_prompts) "
                                           "also answers: 0 = selection and evaluation are on disjoint prompts")
    decoding: Decoding = Field(description="temperature, top_p, max_new_tokens, seed, engine")
    base_answers: list[str] = Field(description="the base model's answers, sampled once before the first step")
    base_tokens: list[int] = Field(description="their lengths (tokens)")
    base_scores: list[float] | None = Field(None, description="pointwise judges: the base answers' scores")
    base_mean_score: Metric | None = Field(None, description="pointwise judges: their mean")
    base_seconds: float = Field(description="wall time of sampling and scoring the base answers")
    planned_steps: list[int] = Field(description="the optimizer steps to evaluate")
    points: list[SelectionPoint] = Field(default_factory=list, description="every evaluated point, in step order")
    kept_step: int | None = Field(None, description="the step whose weights are the run's model (`null` until the "
                                  "first point is evaluated)")
    final_step: int | None = Field(None, description="the last optimizer step of the run")
    seconds: float = Field(0.0, description="total wall time of the selection (base answers and every point)")


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


class RankingMetrics(Model):
    n_lists: int = Field(description="held-out lists with at least one ordered (untied) response pair")
    n_ordered_pairs: int
    pairwise_accuracy: Metric = Field(description="share of ordered response pairs whose implicit rewards agree "
                                      "with the given order (Wilson interval, pairs treated as independent)")
    kendall_tau: Metric = Field(description="per list (concordant - discordant) / ordered pairs, mean over lists")
    best_vs_worst_accuracy: Metric = Field(description="share of lists where the best response out-rewards the worst")


class UnpairedMetrics(Model):
    n_desirable: int
    n_undesirable: int
    desirable_accuracy: Metric = Field(description="share of desirable answers the tuned model raised (reward > 0)")
    undesirable_accuracy: Metric = Field(description="share of undesirable answers it lowered (reward < 0)")
    balanced_accuracy: float = Field(description="the mean of the two accuracies")
    reward_desirable: Metric = Field(description="mean implicit reward of the desirable answers")
    reward_undesirable: Metric


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


class LengthControlledWinRate(Model):
    """The win rate at equal answer length: logistic regression of the judge's preference on the length difference
    (AlpacaEval 2's length-controlled win rate, length term only; dpokit.eval.metrics.length_controlled_win_rate)."""

    value: float = Field(description="predicted win rate of tuned over base at zero length difference")
    ci: list[float] = Field(description="95% interval: delta method on the intercept, on the logit scale")
    n: int = Field(description="judged pairs fitted (ties count 1/2, unparseable left out)")
    method: str = Field(description="`logistic regression on the standardized length difference`, or `every "
                        "outcome equal: the raw win rate` (the fit diverges; raw win rate and its Wilson interval)")
    intercept: float | None = Field(description="a in logit P(tuned preferred) = a + b z")
    slope: float | None = Field(description="b: log-odds per standard deviation of the length difference")
    length_diff_sd: float = Field(description="sd of tuned - base length (tokens), the unit of z")
    ridge: float = Field(description="penalty ridge * b^2 / 2 on the slope (keeps the fit finite under separation)")


class Coefficient(Metric):
    se: float


class ScoreLengthRegression(Model):
    model: str = Field(description="score ~ 1 + length_tokens + is_tuned (OLS)")
    n: int
    intercept: Coefficient
    per_token: Coefficient = Field(description="judge score per extra token")
    tuned_effect: Coefficient = Field(description="the score gain of the tuned model at equal length")


class LengthControlled(Model):
    tolerance: float
    win_rate: LengthControlledWinRate | None = Field(
        None, description="length-controlled win rate: the judge's preference fitted on the standardized length "
        "difference (logistic), predicted at equal length, with its 95% interval; `null` when the length "
        "differences are all equal but not zero")
    buckets: list[LengthBucket] = Field(
        description="win/tie/loss and `win_rate` within `tuned_shorter`, `length_matched` (lengths within "
        "`eval.length_tolerance` of the longer answer), `tuned_longer`: a win rate that holds among length-matched "
        "pairs is not verbosity")
    regression: ScoreLengthRegression | None = Field(
        description="pointwise judges: OLS `score ~ 1 + length_tokens + is_tuned`; `tuned_effect` is the score gain "
        "at equal length, `per_token` the score per extra token (`null` if degenerate)")


class LLMJudgeDetails(Model):
    orders_asked: int
    answers: int
    unparseable_answers: int
    position_consistent_pairs: int
    position_inconsistent_pairs: int
    first_position_picked: int
    second_position_picked: int
    raw_examples: list[str | None] = Field(description="the judge's first replies, as given")


class JudgeInfo(Model):
    name: str
    kind: Literal["pointwise", "pairwise"]
    details: LLMJudgeDetails | dict[str, int] = Field(
        default_factory=dict, description="llm judge: answers asked, unparseable answers, pairs consistent / "
        "inconsistent across the two orders, how often each position was picked; {} for the others")


class ScoreSummary(Model):
    base: Metric = Field(description="mean judge score of the base answers")
    tuned: Metric
    base_values: list[float]
    tuned_values: list[float]


class LengthStats(Model):
    mean: Metric
    median: float
    min: int | None
    max: int | None
    histogram: list[int] = Field(description="counts on the shared `histogram_edges`")
    values: list[int]


class LengthSummary(Model):
    unit: str = "tokens"
    histogram_edges: list[float]
    base: LengthStats
    tuned: LengthStats


class Generation(Model):
    n_prompts: int = Field(description="held-out prompts answered")
    samples_per_prompt: int = Field(description="answers per prompt and model")
    n_samples: int = Field(description="answers per model")
    decoding: Decoding = Field(description="temperature, top_p, max_new_tokens, seed, engine")
    judge: JudgeInfo = Field(
        description="`name`, `kind` (pointwise or pairwise), `details` (llm judge: answers asked, unparseable "
        "answers, pairs consistent / inconsistent across the two orders, how often each position was picked)")
    outcomes: Outcomes = Field(
        description="tuned vs base: counts `wins`, `ties`, `losses`, `unparseable` (left out of every rate), `n` "
        "(judged pairs); rates `win`, `tie`, `loss`; `win_rate` (a tie counts 1/2)")
    scores: ScoreSummary | None = Field(
        description="pointwise judges: mean judge score `base` and `tuned`, and all values (`base_values`, "
        "`tuned_values`); `null` for pairwise judges")
    lengths: LengthSummary = Field(
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


class EvalSettings(EvalConfig):
    """The `eval` section as eval.json records it: keys a later minor version adds are kept, not refused."""

    model_config = ConfigDict(extra="allow")


class EvalResult(Artifact):
    run_dir: str
    model: str = Field(description="the base model")
    beta: float = Field(description="train.beta, the scale of the implicit reward")
    settings: EvalSettings | None = Field(None, description="the `eval` config section used for this evaluation "
                                          "(after any `dpokit eval --set eval.KEY=VALUE`; keys: docs/config.md)")
    preference: PreferenceMetrics
    generation: Generation | None = Field(None, description="judged answers of tuned vs base (`null` with "
                                          "eval.generate: false)")
    kl: KL | None = Field(None, description="KL(tuned || base) on the tuned model's own samples")
    ranking: RankingMetrics | None = Field(None, description="ranked held-out lists: pairwise accuracy and Kendall "
                                           "tau of the implicit rewards against the given order (`null` for pairs)")
    unpaired: UnpairedMetrics | None = Field(None, description="unpaired held-out rows (KTO): share of desirable "
                                             "answers the tuned model raised and undesirable ones it lowered")


class EvalSample(Model):
    """One row of `eval_samples.jsonl`: a tuned and a base answer to the same prompt with the same seed."""

    prompt: UserPrompt
    sample: int
    base: str
    tuned: str
    base_tokens: int
    tuned_tokens: int
    outcome: int | None
    base_score: float | None = None
    tuned_score: float | None = None
    kl_sequence: float
    images: list[str] | None = None  # vision runs: the prompt's images (absolute paths, as data/eval.jsonl has them)


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
    ("data/images/", "vision runs: the images given as bytes or PIL images (parquet, the API), as PNG; "
                     "data/*.jsonl name them by path (image files are named where they are)"),
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
    ("selection.json", "`train.select: best_judge`: the checkpoints evaluated during training with the judge (win "
                       "rate vs base, mean score, KL) and the one kept as `model/` (`Selection`)"),
    ("selection/step-N.safetensors", "`train.select: best_judge`: the weights (LoRA: the adapter) of the best point "
                                     "so far, so `--resume` keeps the selection"),
    ("train_summary.json", "final training metrics, wall time, reference used, step-0 check (`TrainSummary`)"),
    ("eval.json", "evaluation results (`EvalResult`, see below)"),
    ("eval_samples.jsonl", "one row per answer pair: prompt, base, tuned, token counts, judge scores, outcome, "
                           "per-sample log-ratio; vision runs: the prompt's `images` (absolute paths)"),
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


def parse_artifact(model: type[Model], path: Path) -> Any:
    """A JSON artifact read through its model: another schema_version or a changed shape is one line."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read it ({err}); re-run the stage that writes it") from None
    return _parse(model, raw, Path(path))


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
    images_dir = property(lambda self: self.path / "data" / "images")
    reference_eval_logps = property(lambda self: self.path / "data" / "reference_eval_logps.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    model_dir = property(lambda self: self.path / "model")
    training_args = property(lambda self: self.path / "training_args.json")
    train_summary = property(lambda self: self.path / "train_summary.json")
    eval_result = property(lambda self: self.path / "eval.json")
    eval_samples = property(lambda self: self.path / "eval_samples.jsonl")
    report_html = property(lambda self: self.path / "report.html")
    selection = property(lambda self: self.path / "selection.json")
    selection_dir = property(lambda self: self.path / "selection")

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

    def write_images(self, images: list[tuple[Path, Any]]) -> None:
        """Vision runs: the (path, PIL image) pairs of images given without a file, each written atomically as PNG."""
        for path, image in images:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="PNG")
            os.replace(tmp, path)

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

    def write_selection(self, selection: Selection) -> None:
        atomic_write_text(self.selection, _dump(selection))

    def read_selection(self) -> Selection | None:
        return self._read_json(Selection, self.selection)

    def selection_weights(self, step: int) -> Path:
        return self.selection_dir / f"step-{step}.safetensors"

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
    """(dotted key, description) for every documented field, depth first: the README's `eval.json` table. A config
    section (`settings`) is one row: its keys are docs/config.md's."""
    rows = []
    for name, field in model.model_fields.items():
        if name == "schema_version":
            continue
        key = f"{prefix}{name}"
        if field.description:
            rows.append((key, field.description))
        ann = field.annotation
        sub = next((c for c in (ann, *getattr(ann, "__args__", ())) if isinstance(c, type) and issubclass(c, BaseModel)
                    and c is not Metric and not issubclass(c, EvalConfig)), None)
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
