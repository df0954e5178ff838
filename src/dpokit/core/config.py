"""The run config: one YAML file with sections model, data, train, eval and output.

Every field has a default and a help string (`dpokit config-keys` prints them). Unknown keys, wrong types and
missing files are reported all at once, each naming the key and the fix, as one `UserError` line.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dpokit.core.errors import UserError
from dpokit.core.judges import JUDGES

log = logging.getLogger(__name__)

# judge + judge_options are checked against the judge's options model (core/judges.py) by check_judge in the
# plans, with every other static problem: a broken judge hides no other problem, and one that is not used
# (eval.enabled: false, the pairs section in dpokit train) stops nothing.
_JUDGE_NAMES = ", ".join(list(JUDGES)[:-1]) + " or " + list(JUDGES)[-1]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="Hub id, local folder, or an alias: smollm2-135m-instruct (bundled GGUF, converted once), "
        "dpokit-tiny-llama / dpokit-tiny-gpt2 (tiny random models built locally for tests and demos).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    tokenizer: str | None = Field(None, description="Tokenizer id or folder when it differs from the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. auto: float32 on CPU, bfloat16 on a GPU that supports it."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust it.")
    attn_implementation: str | None = Field(None, description="eager, sdpa or flash_attention_2; None = default.")
    allow_pickle_weights: bool = Field(
        False, description="Allow loading .bin (pickle) weights when no safetensors exist. Off for safety."
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the base model's linear layers quantized with bitsandbytes (pip install "
        "'dpokit[quant]'): 4bit (QLoRA: ~0.5 byte per weight) or 8bit (LLM.int8: 1 byte). Only LoRA adapters train "
        "on a quantized base; the reference is the base under the disabled adapter (or precomputed). docs/qlora.md.",
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type (model.quantization: 4bit): nf4 (NormalFloat, QLoRA's) or fp4.")
    double_quant: bool = Field(
        True, description="4-bit: quantize the quantization constants too (QLoRA's double quantization; saves about "
        "0.37 bit per weight). The compute dtype follows train.precision.")
    token_env: str | None = Field(
        None, description="Name of the environment variable holding a hub access token (private models), e.g. "
        "HF_TOKEN. Only the name goes in the config; the value is never logged or written. None = hub default.",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )


class DataConfig(Section):
    source: str = Field(..., description="Local .jsonl/.json/.csv/.parquet file or folder, or a hub dataset id.")
    config_name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split of `source` used for training.")
    eval_source: str | None = Field(None, description="Separate held-out data (file, folder or hub id).")
    eval_split: str | None = Field(
        None, description="Split of `source` (or `eval_source`) to hold out; None = split off `eval_fraction`."
    )
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out fraction when no eval split exists.")
    max_rows: int | None = Field(None, ge=1, description="Use only the first N training rows.")
    max_eval_rows: int | None = Field(None, ge=1, description="Use only the first N held-out rows.")
    format: str = Field("auto", description="Row shape; auto detects it. See `dpokit data formats`.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Column map canonical->yours, e.g. {prompt: question, chosen: good}."
    )
    system_prompt: str | None = Field(None, description="System message prepended to conversational prompts.")
    chat_template: str | None = Field(
        None, description="Chat template for conversational data when the tokenizer has none: 'chatml', 'plain' "
        "(User:/Assistant: lines) or a Jinja string. Overrides the tokenizer's template when set."
    )
    max_length: int = Field(512, ge=8, description="Max tokens of prompt + response.")
    max_prompt_length: int | None = Field(None, ge=1, description="Max prompt tokens (cut from the left).")
    truncation: Literal["prompt_left", "drop", "error"] = Field(
        "prompt_left",
        description="Pairs over max_length: prompt_left cuts the prompt from the left (then the responses from "
        "the right if still too long); drop removes the pair; error stops.",
    )
    on_error: Literal["raise", "skip"] = Field("raise", description="Malformed rows: stop, or skip and count.")
    pairing: Literal["best_worst", "best_random"] = Field(
        "best_worst", description="Scored completions (format scored): chosen = highest score; rejected = lowest "
        "(best_worst) or a random lower-scored one (best_random, seeded by data.seed). Ties are dropped."
    )
    min_score_gap: float = Field(
        0.0, ge=0.0, description="Drop pairs whose chosen and rejected scores differ by less than this (formats "
        "with scores: scored, ultrafeedback_binarized, shp), in the dataset's score units."
    )
    kind: Literal["auto", "pair", "ranked", "unpaired"] = Field(
        "auto", description="Feedback kind to train on: pair (prompt, chosen, rejected), ranked (prompt, responses, "
        "scores; scored completions keep every completion) or unpaired (prompt, completion, label; pairs are split "
        "into a desirable and an undesirable row). auto: the kind the rows have (scored completions: pair)."
    )
    seed: int = Field(42, description="Seed for the train/eval split.")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )
    init_from: str | None = Field(
        None, description="A LoRA adapter folder (e.g. a run's model/) to continue training instead of a fresh "
        "adapter; its own r, alpha and target modules apply. The reference stays the base under the disabled "
        "adapter (reference: adapter) or is computed from the policy as loaded (precomputed). None = a fresh "
        "adapter. dpokit iterate sets it for each round.")


class SyncReferenceConfig(Section):
    alpha: float = Field(0.6, ge=0.0, le=1.0, description="TR-DPO mix-up weight: every `steps` steps the reference "
                         "becomes alpha * policy + (1 - alpha) * reference (TRL's ref_model_mixup_alpha).")
    steps: int = Field(512, ge=1, description="Optimizer steps between reference syncs (TRL's ref_model_sync_steps).")


class TrainConfig(Section):
    engine: Literal["native", "trl"] = Field("native", description="native (dpokit) or trl (trl.DPOTrainer).")
    loss: str | list[str] | dict[str, float] = Field(
        "sigmoid", description="DPO loss, or weighted losses: 'sigmoid:1.0,sft:0.5', a list, or {name: weight}. "
        "Names: see `dpokit losses`.")
    simpo_gamma: float = Field(0.5, ge=0.0, description="SimPO target reward margin gamma (loss: simpo).")
    sft_weight: float = Field(0.0, ge=0.0, description="Weight of an NLL term on the chosen response (RPO); 0 = off.")
    beta: float = Field(0.1, gt=0.0, description="Strength of the KL penalty toward the reference (DPO beta).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="cDPO / robust DPO label noise rate (also eps of "
                                   "exo_pair, which needs it > 0, and of aot / aot_unpaired).")
    discopop_tau: float = Field(0.05, gt=0.0, description="DiscoPOP temperature tau of the mixing sigmoid s(beta h / tau) "
                                "(loss: discopop; TRL's discopop_tau).")
    f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="f-DPO: the divergence to the reference whose f'(pi/ref) replaces the log-ratio "
        "(TRL's f_divergence_type); reverse_kl = DPO. Only for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, "
        "discopop, sft.")
    f_alpha: float | None = Field(None, description="alpha of f_divergence: alpha_divergence (TRL's "
                                  "f_alpha_divergence_coef; 1 = reverse KL); required with it.")
    ld_alpha: float | None = Field(None, ge=0.0, le=1.0, description="LD-DPO: weight in [0, 1] of the response tokens "
                                   "past the shorter response's length (TRL's ld_alpha); None = off (weight 1).")
    use_weighting: bool = Field(False, description="WPO: weight each pair's loss by the policy's length-normalised, "
                                "sampling-aligned probability of both responses (TRL's use_weighting).")
    desirable_weight: float = Field(1.0, gt=0.0, description="KTO weight of desirable rows (lambda_D, loss: kto).")
    undesirable_weight: float = Field(1.0, gt=0.0, description="KTO weight of undesirable rows (lambda_U, loss: kto).")
    learning_rate: float = Field(5e-6, gt=0.0, description="Peak learning rate.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name: linear, cosine, constant...")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the training pairs (ignored if max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1 = use epochs.")
    batch_size: int = Field(4, ge=1, description="Pairs per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 disables).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision. auto: bf16 on a GPU that supports it, fp32 on CPU."
    )
    lora: LoraConfig | None = Field(None, description="LoRA settings; absent = full fine-tune.")
    sync_reference: SyncReferenceConfig | None = Field(
        None, description="TR-DPO (Gorbatovski et al. 2024, \"Learn Your Reference Model for Real Good Alignment\"; "
        "TRL's sync_ref_model): soft-update a separate reference model (reference: model) toward the policy. "
        "Absent = a fixed reference.")
    reference: Literal["auto", "model", "adapter", "precomputed", "none"] = Field(
        "auto",
        description="Reference policy: a frozen copy (model), the base under a disabled LoRA adapter (adapter), "
        "cached log-probs (precomputed) or none (reference-free losses). auto: adapter with LoRA, else model.",
    )
    reference_model: str | None = Field(None, description="Another model id/folder as the reference.")
    disable_dropout: bool = Field(True, description="Turn dropout off in policy and reference (as TRL does).")
    freeze_vision: bool = Field(True, description="Vision-language models: keep the vision tower's weights "
                                "fixed (no LoRA adapter in it); false trains it too.")
    seed: int = Field(42, description="Seed for initialisation, data order and dropout.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    report_to: list[str] | str = Field(
        "none", description="Also log metrics to experiment trackers transformers supports: tensorboard, wandb, "
        "mlflow, comet_ml, trackio, ... (a name or a list); none = off; all = every installed one. TensorBoard "
        "writes to RUN_DIR/logs; each tracker's package must be installed.",
    )
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most N checkpoints.")
    eval_steps: int = Field(0, ge=0, description="Evaluate held-out loss every N steps (0 = never during training).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for PyTorch's operators (torch.set_num_threads). None = PyTorch's default "
        "(OMP_NUM_THREADS when set, else the cores); lower it when other processes share the CPUs (docs/cpu-threads.md).")
    layout: Literal["auto", "varlen", "flex", "dense", "padded"] = Field(
        "auto", description="How training batches are laid out (docs/gpu-engine.md). Packed, prefix-shared and "
        "padding-free ([prompt, chosen, rejected] once per pair) with one of these attention backends: varlen "
        "(FlashAttention variable-length, CUDA), flex (flex_attention BlockMask, CUDA), dense (4-D mask); or padded "
        "(chosen and rejected as two padded rows, as TRL). auto: dense on CPU; on CUDA the first of varlen, flex, "
        "dense that passes the start-up self-check. A packed layout the model fails falls back to padded (with a "
        "warning). Replaces train.packing and train.attention (still read, with a warning, for one more release).",
    )
    reference_batch_size: int | None = Field(
        None, ge=1, description="Pairs per forward pass of the reference precompute (reference: precomputed); no "
        "gradients, so it can be larger than batch_size. None = eval.batch_size (as before this key existed).",
    )
    select: Literal["auto", "best_judge", "last"] = Field(
        "auto", description="Which point of the training path becomes the run's model (docs/select.md): best_judge "
        "evaluates train.select_points checkpoints on train.select_prompts held-out prompts with the eval judge "
        "(win rate vs the base, mean score, KL) and keeps the one with the highest win-rate lower bound; last keeps "
        "the final step. auto (default): best_judge when a judge will run (eval.enabled, eval.generate, "
        "output.save_model, held-out data, one process), else last.",
    )
    select_points: int = Field(4, ge=1, le=64, description="best_judge: checkpoints evaluated, evenly spaced over "
                               "the optimizer steps; the last step is always one of them.")
    select_prompts: int = Field(16, ge=2, le=1024, description="best_judge: held-out prompts answered at each point "
                                "(one short answer each; the base answers are sampled once), taken from the end of "
                                "the distinct held-out prompts so they avoid the eval.num_prompts used by the final "
                                "evaluation where there are enough.")
    max_tokens_per_batch: int | None = Field(
        None, ge=1, description="With packing: length-grouped training batches of up to this many tokens (prompt "
        "once plus both responses) instead of batch_size pairs; loss normalised per pair. None = batch_size pairs.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_layout_keys(cls, data: Any) -> Any:
        """train.packing and train.attention (0.1.0's spellings) become train.layout, with a one-line warning.
        Remove in the release after next."""
        if not isinstance(data, dict) or not ({"packing", "attention"} & data.keys()):
            return data
        data = dict(data)
        packing, attention = data.pop("packing", None), data.pop("attention", None)
        if "layout" in data:
            raise ValueError("train.packing / train.attention were replaced by train.layout; keep only train.layout")
        if packing is not None and not isinstance(packing, bool):
            raise ValueError(f"train.packing must be true or false, got {packing!r}; better: train.layout (auto, "
                             "varlen, flex, dense or padded)")
        layout = "padded" if packing is False else (attention or "auto")
        said = [f"train.packing: {str(packing).lower()}" if packing is not None else "",
                f"train.attention: {attention}" if attention is not None else ""]
        log.warning("%s is deprecated: write train.layout: %s (it will stop working in the release after next)",
                    " and ".join(x for x in said if x), layout)
        data["layout"] = layout
        return data

    @property
    def packed(self) -> bool:
        """Prefix-shared packed batches (train.layout other than padded)."""
        return self.layout != "padded"


class EvalConfig(Section):
    enabled: bool = Field(True, description="Evaluate at the end of `dpokit train`.")
    batch_size: int = Field(8, ge=1, description="Pairs per forward pass during evaluation.")
    max_pairs: int | None = Field(None, ge=1, description="Evaluate at most N held-out pairs.")
    generate: bool = Field(True, description="Sample answers from base and tuned models for held-out prompts, "
                           "judge them (win/tie/loss) and estimate KL(tuned||base).")
    num_prompts: int = Field(16, ge=1, description="Held-out prompts to generate for (distinct prompts, in order).")
    samples_per_prompt: int = Field(1, ge=1, description="Sampled answers per prompt and model.")
    max_new_tokens: int = Field(48, ge=1, description="Max tokens per generated answer.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (0 = greedy). KL is exact only at 1.0 "
                               "with top_p 1.0, where the samples come from the tuned model itself.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    seed: int = Field(0, description="Sampling seed; base and tuned models draw the same random numbers.")
    gen_batch_size: int = Field(16, ge=1, description="Sequences sampled together (one batch).")
    engine: Literal["fast", "hf"] = Field("fast", description="Sampler: fast (prefill each prompt once, fork its KV "
                                          "cache, own decode loop; 2-2.2x hf's tokens/s on a 2-core CPU) or hf "
                                          "(transformers' generate, the reference). Their random streams differ.")
    judge: str = Field("sentiment", description=f"Judge of tuned vs base answers: {_JUDGE_NAMES}. See "
                       "docs/evaluation.md.")
    judge_options: dict[str, Any] = Field(default_factory=dict, description="Options of the judge, e.g. "
                                          "{model: ./my-rm} or {base_url: http://127.0.0.1:8000/v1, model: m, "
                                          "api_key_env: OPENAI_API_KEY}.")
    length_tolerance: float = Field(0.2, ge=0.0, description="Length-controlled view: tuned and base answers count "
                                    "as length-matched when their token counts differ by at most this fraction.")


class PairsConfig(Section):
    """On-policy pair generation (`dpokit quickstart`, `dpokit data generate`): sample, judge, best vs worst."""

    prompts: str | None = Field(None, description="Prompts file (.txt one a line, or .jsonl with 'prompt'); "
                                "None = the bundled quickstart prompts.")
    num_prompts: int | None = Field(None, ge=2, description="Use only the first N prompts (after the seeded "
                                    "shuffle); None = all.")
    eval_prompts: int = Field(80, ge=1, description="Prompts held out from training: their pairs are the held-out "
                              "pairs, their prompts the win-rate prompts.")
    num_samples: int = Field(4, ge=2, description="Answers sampled per prompt; the best and worst form a pair.")
    max_new_tokens: int = Field(48, ge=1, description="Max tokens per sampled answer.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    judge: str = Field("sentiment", description="Judge scoring each answer; higher = preferred.")
    judge_options: dict[str, Any] = Field(default_factory=dict, description="Options of the judge.")
    min_gap: float = Field(0.1, ge=0.0, description="Keep a pair only if best - worst score >= this (ties dropped).")
    batch_size: int = Field(32, ge=1, description="Sequences sampled together (one batch).")
    engine: Literal["fast", "hf"] = Field("fast", description="Sampler: fast (prefill each prompt once, fork its KV "
                                          "cache, own decode loop) or hf (transformers' generate, the reference). "
                                          "Their random streams differ, so the pairs differ.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Sampling precision. auto: bfloat16 on a bf16 GPU or a CPU with native bf16 "
        "(AMX/AVX512-BF16), else float32. Training precision is train.precision.")
    seed: int = Field(0, description="Seed of the prompt shuffle and of sampling.")


class IterateConfig(Section):
    """Iterative on-policy DPO (`dpokit iterate`): rounds of sample -> judge -> train, one LoRA adapter continued."""

    rounds: int = Field(3, ge=1, description="Rounds of sample (current policy) -> judge -> pairs -> train -> "
                        "evaluate.")
    prompts_per_round: int | None = Field(None, ge=1, description="Training prompts sampled per round, disjoint "
                                          "across rounds; None = the training prompts split evenly into `rounds` "
                                          "chunks.")
    reference: Literal["initial", "previous"] = Field(
        "initial", description="DPO reference of every round: initial = the starting model pi0 (the base under the "
        "disabled adapter; RLHFlow's recipe); previous = the policy at the round's start (log-probs precomputed).")
    learning_rate: float | None = Field(None, gt=0.0, description="Peak learning rate of each round; None = "
                                        "train.learning_rate.")
    epochs: float | None = Field(None, gt=0.0, description="Passes over each round's pairs; None = train.epochs.")
    sft_weight: float | None = Field(None, ge=0.0, description="NLL weight on the chosen answers in each round "
                                     "(Iterative RPO); None = train.sft_weight.")
    compare_offline: bool = Field(False, description="Also train a budget-matched offline arm: every round's "
                                  "prompts sampled from pi0 at once, the same total optimizer steps.")


class OutputConfig(Section):
    dir: str = Field("runs/dpokit", description="Run folder (relative paths are from the current directory).")
    overwrite: bool = Field(False, description="Replace an existing run folder.")
    save_model: bool = Field(True, description="Save the final model (or adapter) and tokenizer.")


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="On-policy pair generation "
                               "(dpokit quickstart); ignored by dpokit train.")
    iterate: IterateConfig = Field(default_factory=IterateConfig, description="Iterative on-policy rounds "
                                   "(dpokit iterate); ignored by dpokit train.")

    @model_validator(mode="after")
    def _cross_field_checks(self) -> RunConfig:
        problems = []
        if self.train.reference == "adapter" and self.train.lora is None:
            problems.append("train.reference: 'adapter' needs train.lora; set train.lora or use reference: model")
        if self.train.reference_model and self.train.reference not in ("auto", "model", "precomputed"):
            problems.append("train.reference_model: only used with reference: model or precomputed")
        if self.train.f_divergence == "alpha_divergence" and self.train.f_alpha is None:
            problems.append("train.f_alpha: f_divergence: alpha_divergence needs its alpha; set train.f_alpha "
                            "(e.g. 0.5; TRL's default f_alpha_divergence_coef)")
        # Loss names are checked against the loss registry by the training plan (dpokit.train.plan), which
        # lives above this layer.
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Keys holding paths that are resolved against the YAML file's folder when they exist there.
_PATH_KEYS = (("data", "source"), ("data", "eval_source"), ("model", "name_or_path"), ("model", "tokenizer"),
              ("train", "reference_model"))


def _resolve_relative_paths(raw: dict, base: Path) -> None:
    for section, key in _PATH_KEYS:
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and not os.path.isabs(value):
            candidate = base / value
            if candidate.exists():
                raw[section][key] = str(candidate.resolve())


def checked_overrides(values: list[str] | None) -> list[str] | None:
    """The CLI's `--set` callback: `--set train.beta 0.2` (a space for '=') names the --set value and the fix. Click
    runs option callbacks before it refuses extra arguments, so this line comes instead of its "unexpected extra
    argument (0.2)"."""
    for item in values or []:
        if "=" not in item:
            parse_override(item)  # raises the UserError that explains the form
    return values


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], parsed value). Values are read as YAML scalars/lists."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: no '=' in it; write section.key=value, e.g. --set train.beta=0.2 (a space "
                        "instead of '=' does not work)")
    key, _, value = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise UserError(f"--set {item!r}: no section in the key; name it, e.g. --set "
                        f"train.{key.strip() or 'beta'}={value}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(node[part], dict):
                raise UserError(f"--set {item!r}: {part} is not a section")
            node = node[part]
        node[parts[-1]] = value
    return raw


def _format_validation_error(err: ValidationError, origin: str, prefix: tuple[str, ...] = (),
                             labels: dict[str, str] | None = None) -> str:
    """One line naming every problem by its dotted key. `prefix`: the section when a section was validated on its
    own; `labels`: how the user gave a key other than in YAML, e.g. {"pairs.num_samples": "--num-samples"}."""
    problems, from_set = [], []
    for e in err.errors():
        loc = (*prefix, *e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        label = (labels or {}).get(key)
        # A `--set` key is named by the flag the user typed; other labels (a CLI flag) go after the key.
        shown = label if label and label.startswith("--set ") else f"{key} ({label})" if label else key
        from_set.append(bool(label and label.startswith("--set ")))
        kind = e["type"]
        if kind == "extra_forbidden":
            section = ".".join(str(p) for p in loc[:-1])
            valid = _valid_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            hint = f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}? " if close else ""
            problems.append(f"{shown}: unknown key; {hint}valid keys{' in ' + section if section else ''}: "
                            f"{', '.join(valid)}")
        elif kind == "missing":
            problems.append(f"{shown}: required; add it to the config or pass --set {key}=...")
        else:
            got = e.get("input")
            msg = e["msg"].replace("Value error, ", "")
            if key == "(top level)":
                problems.append(msg)
            elif kind == "value_error" and isinstance(got, dict):  # a section's own check: its message names the keys
                problems.append(f"{shown}: {msg}")
            else:
                problems.append(f"{shown}: {msg} (got {got!r}); see `dpokit config-keys` for its type")
    if from_set and all(from_set):  # the YAML file is fine: do not send the user there
        return "; ".join(problems)
    return f"{origin}: invalid config: " + "; ".join(problems)


def _valid_keys(loc) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def config_from_dict(raw: dict, origin: str = "config", labels: dict[str, str] | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, origin, labels=labels)) from None


def section_from_dict(section: str, raw: dict | None, origin: str = "config",
                      labels: dict[str, str] | None = None) -> Section:
    """One section of the run config (e.g. "pairs" -> `PairsConfig`) validated on its own, for commands that take
    only that section. Problems are one `UserError` line naming `section.KEY` (and its flag, via `labels`)."""
    field = RunConfig.model_fields.get(section)
    section_cls = field and next((c for c in (field.annotation, *getattr(field.annotation, "__args__", ()))
                                  if isinstance(c, type) and issubclass(c, Section)), None)
    if section_cls is None:
        raise ValueError(f"{section!r} is not a section of RunConfig")
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"{origin}: {section}: expected a mapping of keys, got {type(raw).__name__}")
    try:
        return section_cls.model_validate(raw or {})
    except ValidationError as err:
        raise UserError(_format_validation_error(err, origin, (section,), labels)) from None


def reference_batch_size(cfg: RunConfig) -> int:
    """Pairs per forward pass of training's reference precompute: train.reference_batch_size, else eval.batch_size
    (the one key that set it before)."""
    return cfg.train.reference_batch_size or cfg.eval.batch_size


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, check_files: bool = True) -> RunConfig:
    """Read, override and validate a run config. Raises `UserError` with every problem on one line.

    `check_files=False` leaves the data/model paths to the caller's plan (`dpokit.train.plan`), which reports them
    together with every other problem."""
    path = Path(path)
    raw = read_config_file(path)
    apply_overrides(raw, overrides or [])
    # A key given with --set is named as such, so its typo is not blamed on the YAML file.
    labels = {".".join(parse_override(item)[0]): f"--set {item}" for item in overrides or []}
    cfg = config_from_dict(raw, str(path), labels)
    if check_files:
        check_paths(cfg, str(path))
    return cfg


def read_config_file(path: str | os.PathLike) -> dict:
    """A run config YAML as a dict of sections, not yet validated: relative paths resolved against its folder,
    empty sections as {}. Unreadable files, malformed YAML and non-mapping sections are one `UserError` line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass the path to a YAML file such as configs/tiny.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}:{where}: malformed YAML ({problem}); fix the syntax there") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with sections model, data, train, eval, output")
    # A run folder's config.yaml carries the folder's schema_version (core/run.py); it is not a config key, and
    # `dpokit train RUN_DIR/config.yaml --resume` must read it.
    raw.pop("schema_version", None)
    for section, value in raw.items():
        if value is not None and not isinstance(value, dict) and section in RunConfig.model_fields:
            raise UserError(f"{path}: {section}: expected a mapping of keys, got {type(value).__name__}")
        if value is None:
            raw[section] = {}
    _resolve_relative_paths(raw, path.resolve().parent)
    return raw


def looks_like_local_path(value: str) -> bool:
    """A hub id is `name` or `org/name`; anything with a file suffix, ./, ../, ~ or / at the start is local."""
    if value.startswith(("/", "./", "../", "~")) or os.path.exists(value):
        return True
    return Path(value).suffix.lower() in {".jsonl", ".json", ".csv", ".parquet", ".yaml", ".yml", ".txt"}


def check_paths(cfg: RunConfig, origin: str) -> None:
    problems = []
    for key in ("source", "eval_source"):
        value = getattr(cfg.data, key)
        if value and looks_like_local_path(value) and not os.path.exists(os.path.expanduser(value)):
            problems.append(f"data.{key}: {value!r} not found; give an existing file/folder or a hub dataset id")
    init_from = cfg.train.lora.init_from if cfg.train.lora else None
    if init_from and not os.path.isfile(os.path.join(os.path.expanduser(init_from), "adapter_config.json")):
        problems.append(f"train.lora.init_from: {init_from!r} is not a LoRA adapter folder (no adapter_config.json); "
                        "give the model/ folder of a LoRA run")
    for section, key in (("model", "name_or_path"), ("model", "tokenizer"), ("train", "reference_model")):
        value = getattr(getattr(cfg, section), key)
        if value and value.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(value)):
            problems.append(f"{section}.{key}: folder {value!r} not found; give an existing folder or a hub id")
    if problems:
        raise UserError(f"{origin}: " + "; ".join(problems))
