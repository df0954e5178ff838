"""Plan, then run: every static decision and check of a training run, before any weights load or file is written.

`plan_training(cfg) -> TrainPlan` resolves the loss terms, the reference, the precision and the run-folder action,
and checks everything that can be checked without the model: loss vs reference, the TRL engine's limits, precision
on this hardware, trackers, data paths, the judge the evaluation will use, and the run folder. All problems are
reported together, each with its fix, as one `UserError` (exit 2, nothing written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpokit.core.config import RunConfig, check_paths
from dpokit.core.errors import UserError
from dpokit.core.judges import check_judge
from dpokit.core.processes import is_main_process, world_size
from dpokit.core.quant import bitsandbytes_problem
from dpokit.core.run import RunDir
from dpokit.train.checkpoints import last_complete_checkpoint
from dpokit.train.distributed import launcher_problems, requested_strategy
from dpokit.train.losses import loss_names, needs_reference, option_problems, parse_loss_spec, terms_kind
from dpokit.train.trackers import check_report_to
from dpokit.train.trl_engine import check_trl_config
from dpokit.train.vision import is_vision_run, vision_plan_problems


@dataclass(frozen=True)
class TrainPlan:
    cfg: RunConfig
    run_dir: RunDir
    loss_terms: list[tuple[str, float]]
    reference: str  # model | adapter | precomputed | none: what training will actually use
    bf16: bool
    fp16: bool
    resume: bool
    replace_run_dir: bool  # --overwrite of a non-empty folder: deleted once setup has validated the data
    evaluate: bool  # the caller chains `dpokit.evaluate` after training (its judge was checked here)
    select: str = "last"  # best_judge | last: train.select as resolved (dpokit.train.select)
    vision: bool = False  # the rows carry images (dpokit.train.vision)


def pick_precision(precision: str) -> tuple[bool, bool]:
    """(bf16, fp16) for TrainingArguments; raises UserError when this hardware cannot run it."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return (cuda and torch.cuda.is_bf16_supported()), False
    if precision in ("bf16", "fp16") and not cuda:
        raise UserError(f"train.precision: {precision} needs a GPU; use fp32 (or auto) on CPU")
    return precision == "bf16", precision == "fp16"


def resolve_reference(cfg: RunConfig, terms: list[tuple[str, float]]) -> str:
    if not needs_reference(terms):
        return "none"
    if cfg.train.reference == "none":
        raise UserError(f"train.reference: none, but loss {cfg.train.loss!r} needs a reference; use auto, model, "
                        "adapter or precomputed, or a reference-free loss (simpo, orpo, sft)")
    if cfg.train.reference == "auto":
        return "adapter" if cfg.train.lora is not None and not cfg.train.reference_model else "model"
    return cfg.train.reference


def plan_training(cfg: RunConfig, *, resume: bool = False, evaluate: bool | None = None,
                  origin: str = "config") -> TrainPlan:
    """All static checks of a run; raises one UserError listing every problem. `evaluate`: whether evaluation
    follows training (default `eval.enabled`); its judge is then checked here, not after the training."""
    problems: list[str] = []

    def check(fn, *args):
        try:
            return fn(*args)
        except UserError as err:
            problems.append(str(err))
            return None

    terms = check(lambda: _loss_terms(cfg)) or []
    if terms and cfg.data.kind != "auto":  # with auto the rows tell, once read (setup checks again)
        check(check_loss_kind, terms, cfg.data.kind)
    if terms and terms_kind(terms) != "pair" and cfg.train.engine == "trl":
        problems.append(f"train.engine: trl trains pairs only, and loss {cfg.train.loss!r} takes "
                        f"{terms_kind(terms)} rows; use train.engine: native")
    reference = check(resolve_reference, cfg, terms) if terms else None
    problems += per_token_option_problems(cfg, terms, reference)
    problems += sync_reference_problems(cfg, reference, resume)
    if reference is not None and cfg.train.engine == "trl":
        reference = check(check_trl_config, cfg.train, reference)
    precision = check(pick_precision, cfg.train.precision) or (False, False)
    problems += check_report_to(cfg.train.report_to)
    problems += launcher_problems(cfg.train.engine)  # FSDP / ZeRO that would fall back
    problems += quantization_problems(cfg, reference)
    check(check_paths, cfg, origin)

    evaluate = cfg.eval.enabled if evaluate is None else evaluate
    evaluate = evaluate and cfg.output.save_model
    vision = is_vision_run(cfg)
    if vision:
        problems += vision_plan_problems(cfg, evaluate)
    select = "last" if vision else check(resolve_select, cfg, evaluate) or "last"  # best_judge samples text only
    if (evaluate and cfg.eval.generate) or select == "best_judge":
        problems += check_judge(cfg.eval.judge, cfg.eval.judge_options)

    run_dir = RunDir(cfg.output.dir)
    replace = False
    if resume:
        if last_complete_checkpoint(run_dir.checkpoints) is None:
            problems.append(f"--resume: {run_dir.path} has no checkpoints to resume from (no complete checkpoint-N); "
                            "drop --resume to start fresh, or set train.save_steps to checkpoint during training")
    elif is_main_process() and run_dir.exists_nonempty():  # other ranks may start after rank 0 created it
        if cfg.output.overwrite:
            replace = True
        else:
            problems.append(f"output.dir: {run_dir.path} already exists and is not empty; pass --overwrite, choose "
                            "another --set output.dir=..., or --resume to continue it")
    if problems:
        raise UserError("; ".join(dict.fromkeys(problems)))  # each problem once, in the order found
    return TrainPlan(cfg=cfg, run_dir=run_dir, loss_terms=terms, reference=reference, bf16=precision[0],
                     fp16=precision[1], resume=resume, replace_run_dir=replace, evaluate=evaluate,
                     select=select, vision=vision)


def resolve_select(cfg: RunConfig, evaluate: bool) -> str:
    """train.select as it will run: best_judge or last. auto is best_judge exactly when the evaluation that follows
    will judge answers (eval.enabled and eval.generate, a saved model, held-out data) on one process; an explicit
    best_judge that cannot run is an error naming the fix, never a silent `last`."""
    t = cfg.train
    missing = []
    if not (evaluate and cfg.eval.generate):
        missing.append("a judge (eval.enabled: true and eval.generate: true, without --no-eval)")
    if not cfg.output.save_model:
        missing.append("output.save_model: true (the kept point becomes model/)")
    if not (cfg.data.eval_source or cfg.data.eval_split or cfg.data.eval_fraction > 0):
        missing.append("held-out prompts (data.eval_fraction > 0, data.eval_split or data.eval_source)")
    if world_size() > 1:
        missing.append("a single process (selection under torchrun/accelerate launch is not supported yet)")
    if t.select == "auto":
        return "last" if missing else "best_judge"
    if t.select == "best_judge" and missing:
        raise UserError(f"train.select: best_judge needs {' and '.join(missing)}; provide that, or set "
                        "train.select: last to keep the final step")
    return t.select


def quantization_problems(cfg: RunConfig, reference: str | None) -> list[str]:
    """model.quantization: what cannot run on a quantized base, each with its fix (docs/qlora.md)."""
    q = cfg.model.quantization
    if q == "none":
        return []
    key = f"model.quantization: {q}"
    problems = []
    missing = bitsandbytes_problem()
    if missing:
        problems.append(f"{key} needs bitsandbytes: {missing}")
    if cfg.train.lora is None:
        problems.append(f"{key} trains LoRA adapters only (quantized weights take no gradient updates); set "
                        "train.lora (e.g. --set train.lora.r=16) or model.quantization: none for a full fine-tune")
    if reference == "model" and not cfg.train.reference_model:
        problems.append(f"train.reference: model would copy the {q} base; use reference: adapter (the quantized "
                        "base under the disabled adapter, no second copy) or precomputed")
    strategy = requested_strategy()
    if strategy in ("fsdp", "deepspeed"):
        problems.append(f"{key}: the accelerate launch config asks for {strategy}, which cannot shard bitsandbytes' "
                        f"{q} weights; launch with configs/accelerate/ddp.yaml (each process holds the small "
                        "quantized base) or set model.quantization: none")
    if cfg.train.engine == "trl":
        problems.append(f"{key}: train.engine: trl is not supported on a quantized base; use train.engine: native")
    return problems


def check_loss_kind(terms: list[tuple[str, float]], kind: str) -> None:
    """The loss must take the data's feedback kind (pair, ranked, unpaired); the fix names both ways out."""
    want = terms_kind(terms)
    if want == kind:
        return
    names = ", ".join(n for n, _ in terms)
    how = {"pair": "scored lists become best-vs-worst pairs", "ranked": "scored completions keep every "
           "completion, pairs become 2-response lists", "unpaired": "each pair splits into a desirable and an "
           "undesirable row"}[want]
    raise UserError(f"train.loss: {names} trains on {want} rows, but the data is {kind}; set data.kind: {want} "
                    f"({how}) or use a loss for {kind} rows ({', '.join(loss_names(kind))})")


def per_token_option_problems(cfg: RunConfig, terms: list[tuple[str, float]], reference: str | None) -> list[str]:
    """The loss options the losses or the reference cannot take (f-divergence, WPO, LD-DPO), each with its fix."""
    if not terms:
        return []
    problems = option_problems(terms, cfg.train)
    options = [k for k in ("ld_alpha", "use_weighting") if getattr(cfg.train, k) not in (None, False)]
    if options and terms_kind(terms) != "pair":
        problems.append(f"train.{options[0]}: applies to pair losses only, and loss {cfg.train.loss!r} takes "
                        f"{terms_kind(terms)} rows; unset it, or use a pair loss")
    if cfg.train.ld_alpha is not None and reference == "precomputed":
        problems.append("train.ld_alpha: the precomputed reference cache holds whole-response sums, not LD-DPO's "
                        "shared/tail split; use train.reference: model (or adapter with LoRA), or unset ld_alpha")
    return problems


def sync_reference_problems(cfg: RunConfig, reference: str | None, resume: bool) -> list[str]:
    """TR-DPO needs reference weights of its own to move: a separate reference model."""
    if cfg.train.sync_reference is None or reference is None:
        return []
    fixes = {"precomputed": "the precomputed reference is a cache of log-probs, not weights to sync; use "
                            "train.reference: model, or unset train.sync_reference",
             "adapter": "with LoRA the reference is the base under the disabled adapter, which the policy shares; "
                        "moving it toward the policy would move the policy's base too; use train.reference: model "
                        "(a separate copy), or unset train.sync_reference",
             "none": f"loss {cfg.train.loss!r} is reference-free; unset train.sync_reference"}
    if reference in fixes:
        return [f"train.sync_reference: {fixes[reference]}"]
    if cfg.train.lora is not None:
        return ["train.sync_reference: with LoRA only the adapter trains, and the policy's parameters are not a "
                "separate reference's to mix; train the full model (unset train.lora), or unset "
                "train.sync_reference"]
    if resume and cfg.train.engine == "trl":
        return ["--resume: with engine: trl the synced reference (TRL's sync_ref_model) is not part of the "
                "checkpoints, so a resumed run would restart from the initial reference; use engine: native, or "
                "start a fresh run"]
    return []


def _loss_terms(cfg: RunConfig) -> list[tuple[str, float]]:
    try:
        return parse_loss_spec(cfg.train.loss, cfg.train.sft_weight)
    except ValueError as err:
        raise UserError(f"train.loss: {err}") from None
