"""`train.engine: trl`: the same run through `trl.DPOTrainer` (trl pinned in pyproject's `trl` extra).

A cross-check and fallback, not the default. TRL trains on exactly the token ids dpokit encoded (its own
tokenization would differ at the prompt/response boundary), with the same TrainingArguments, the same run folder
and the same metric names (`loss`, `rewards/*`, `logps/*`; TRL adds a few of its own, e.g. `entropy`).
Supported: the losses both implement (the registry records' `trl_name`; `sigmoid` only without label smoothing, since TRL
ignores it there) and reference `model` or `adapter`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dpokit.core.errors import UserError
from dpokit.train.losses import parse_loss_spec, trl_loss_names

if TYPE_CHECKING:
    from transformers import TrainingArguments

# transformers' TrainingArguments and Trainer (and with them peft and bitsandbytes, seconds of imports) load only
# when a TRL run is built: `dpokit plan` and `dpokit train`'s checks import `check_trl_config` from here.


def trl_loss_types(train_cfg) -> tuple[list[str], list[float]]:
    terms = parse_loss_spec(train_cfg.loss, train_cfg.sft_weight)
    trl_names = trl_loss_names()
    unsupported = [name for name, _ in terms if name not in trl_names]
    if unsupported:
        raise UserError(f"train.engine: trl does not implement loss {', '.join(unsupported)}; use engine: native, "
                        f"or one of {', '.join(trl_names)}")
    if train_cfg.label_smoothing and any(name == "sigmoid" for name, _ in terms):
        raise UserError("train.label_smoothing: TRL's sigmoid loss ignores label smoothing (cDPO); use engine: native "
                        "or label_smoothing: 0")
    if train_cfg.use_weighting and any(name == "sft" for name, _ in terms):
        # TRL 1.16 multiplies sft's expanded per-sequence tensor in place and raises ("more than one element of
        # the written-to tensor refers to a single memory location"); drop when TRL clones it.
        raise UserError("train.use_weighting: TRL 1.16 fails with WPO weighting on the sft term; use engine: native, "
                        "or drop sft / use_weighting")
    return [trl_names[name] for name, _ in terms], [weight for _, weight in terms]


def check_trl_config(train_cfg, reference: str) -> str:
    """Validate before anything is written; returns the reference TRL will use (it always has one)."""
    trl_loss_types(train_cfg)
    if train_cfg.lora is not None and train_cfg.lora.init_from:
        raise UserError("train.lora.init_from: continuing an adapter is supported by engine: native only; use "
                        "engine: native")
    if reference == "none":
        return "adapter" if train_cfg.lora is not None else "model"
    if reference not in ("model", "adapter"):
        raise UserError(f"train.reference: {reference} is not supported with engine: trl; use model or adapter "
                        "(or engine: native)")
    return reference


def dpo_config(args: TrainingArguments, train_cfg):
    from transformers import TrainingArguments
    from trl import DPOConfig

    loss_type, loss_weights = trl_loss_types(train_cfg)
    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    # Our pairs are already truncated by data.max_length; TRL must not cut them again.
    return DPOConfig(**base, beta=train_cfg.beta, loss_type=loss_type, loss_weights=loss_weights,
                     label_smoothing=train_cfg.label_smoothing, max_length=None, precompute_ref_log_probs=False,
                     disable_dropout=train_cfg.disable_dropout, **trl_loss_options(train_cfg))


def trl_loss_options(train_cfg) -> dict:
    """dpokit's loss options under TRL's DPOConfig names."""
    options = {"f_divergence_type": train_cfg.f_divergence, "ld_alpha": train_cfg.ld_alpha,
               "use_weighting": train_cfg.use_weighting, "discopop_tau": train_cfg.discopop_tau}
    if train_cfg.f_alpha is not None:
        options["f_alpha_divergence_coef"] = train_cfg.f_alpha
    if train_cfg.sync_reference is not None:
        options.update(sync_ref_model=True, ref_model_mixup_alpha=train_cfg.sync_reference.alpha,
                       ref_model_sync_steps=train_cfg.sync_reference.steps)
    return options


def build_trl_trainer(cfg, model, tokenizer, args, train_enc, eval_enc, ref_model, reference):
    from datasets import Dataset
    from trl import DPOTrainer

    from dpokit.train.resilience import AtomicCheckpointMixin

    class TRLDPOTrainer(AtomicCheckpointMixin, DPOTrainer):
        """TRL's trainer with dpokit's checkpoints: written to a staging folder, renamed into place when complete."""

    trl_args = dpo_config(args, cfg.train)
    peft_config = None
    if cfg.train.lora is not None and hasattr(model, "peft_config"):
        # TRL wraps the model itself (and patches its LM head first), so hand it the base model and the LoRA config.
        peft_config = model.peft_config["default"]
        model = model.unload()
    # TRL insists on tokenizing text; give it one placeholder row, then swap in dpokit's token ids so both engines
    # train on identical inputs.
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = TRLDPOTrainer(model=model, ref_model=ref_model if reference == "model" else None, args=trl_args,
                            train_dataset=placeholder, eval_dataset=placeholder if eval_enc else None,
                            processing_class=tokenizer, peft_config=peft_config)
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    trainer.train_dataset = Dataset.from_list([{k: p[k] for k in columns} for p in train_enc])
    if eval_enc:
        trainer.eval_dataset = Dataset.from_list([{k: p[k] for k in columns} for p in eval_enc])
    return trainer
