"""DPO training on `transformers.Trainer`: the loop, checkpoints and distribution are Trainer's; the loss is ours.

Entry point: `run_training(cfg) -> TrainResult`, a short recipe read at the bottom of this file:
plan (dpokit.train.plan: every static check) -> setup (data, then models) -> write the run folder's start -> fit ->
save. Evaluation is not part of training: the caller chains it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from dpokit.core.config import RunConfig, reference_batch_size
from dpokit.core.errors import UserError
from dpokit.core.io import chmod_tree_as_created
from dpokit.core.models import load_model, load_model_and_tokenizer, load_tokenizer, quiet_hf
from dpokit.core.packing import batch_logps, is_list_batch, list_logps, pair_length
from dpokit.core.processes import is_main_process, join_process_group, no_accelerator
from dpokit.core.quant import bnb_config, is_quantized, prepare_for_kbit_training
from dpokit.core.run import ReferenceEvalLogps, TrainSummary
from dpokit.core.scoring import pairs_fingerprint
from dpokit.core.secrets import apply_token_env
from dpokit.core.threads import apply_num_threads, cpu_load_of_others, oversubscription_warning
from dpokit.core.vision import share_frozen_tower
from dpokit.data import PreferenceData
from dpokit.data.prepare import prepare_data
from dpokit.train.checkpoints import checkpoint_step, last_complete_checkpoint
from dpokit.train.console import ConsoleCallback
from dpokit.train.distributed import CpuFsdpMixin, check_strategy, distributed_summary
from dpokit.train.feedback import feedback_inputs, feedback_metrics
from dpokit.train.losses import REGISTRY, PairLogps, combined_loss, needs_reference, parse_loss_spec
from dpokit.train.packing import PackingTrainerMixin, TokenBudgetBatchSampler, choose_collator
from dpokit.train.plan import TrainPlan, check_loss_kind, plan_training
from dpokit.train.reference import precompute
from dpokit.train.resilience import (
    AtomicCheckpointMixin,
    StopOnSignal,
    TrainingStopped,
    clean_staging,
    destroy_process_group_at_exit,
    quiet_non_main_process,
    restore_loss_sum,
    restore_synced_reference,
    trim_metrics,
    whole_run_train_loss,
)
from dpokit.train.select import SelectionCallback
from dpokit.train.trackers import tracker_arguments
from dpokit.train.trl_engine import build_trl_trainer
from dpokit.train.vision import VisionPairCollator, load_vision_model, lora_targets, prepare_vision_data

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    final_metrics: dict
    wall_seconds: float
    evaluate: bool = False  # the plan says evaluation follows (eval.enabled, a saved model, held-out pairs)


class DPOTrainer(CpuFsdpMixin, AtomicCheckpointMixin, PackingTrainerMixin, Trainer):
    """Overrides: compute_loss (the DPO objective), prediction_step (eval loss without logits), log (adds the
    averaged DPO metrics to every logged row)."""

    def __init__(self, *args, dpo_cfg, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo_cfg = dpo_cfg
        self.ref_model = ref_model
        self.loss_terms = parse_loss_spec(dpo_cfg.loss, dpo_cfg.sft_weight)
        self.needs_reference = needs_reference(self.loss_terms)
        # Our loss is a mean over pairs, so Trainer must divide it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._stored = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.reference_forwards = 0  # reference forward passes during training (0 with precomputed log-probs)
        self.vision_share = None  # a SharedTowerOutput (dpokit.core.vision) when the reference can reuse image encodes
        self.step0_check: dict | None = None
        self._step_loss: torch.Tensor | None = None  # sum of this optimizer step's micro-batch losses, on the device
        self._sparse_metrics: set[str] = set()  # metrics a batch may lack (ranked/unpaired feedback): NaN = none

    def reference_logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        self.reference_forwards += 1
        # vision runs: the reference reuses the policy's frozen image encodes of this batch (share_frozen_tower)
        share = self.vision_share.reusing() if self.vision_share is not None else contextlib.nullcontext()
        with torch.no_grad(), share:
            ld_alpha = self.dpo_cfg.ld_alpha
            if self.ref_model is not None:
                out = batch_logps(self.ref_model, batch, ld_alpha)
            else:  # LoRA: the base model is the policy with its adapter switched off
                with self.accelerator.unwrap_model(model).disable_adapter():
                    out = batch_logps(model, batch, ld_alpha)
        return out["chosen"], out["rejected"]

    # Workaround: transformers 5.x Trainer leaves autocast to accelerate (`autocast_smart_context_manager` is a
    # nullcontext), and accelerate wraps only the prepared model's own `forward`; the chunked head runs after that
    # forward and the reference model is never prepared, so under train.precision bf16 with fp32 master weights both
    # ran fp32. The whole loss computation runs under the accelerator's autocast instead (a no-op without mixed
    # precision); remove if Trainer's compute_loss_context_manager enters accelerate's autocast itself.
    def compute_loss_context_manager(self):
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.accelerator.autocast())
        return stack

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if is_list_batch(inputs):
            return self._feedback_loss(model, inputs, return_outputs, num_items_in_batch)
        policy = batch_logps(model, inputs, self.dpo_cfg.ld_alpha, self.dpo_cfg.use_weighting)
        lp = PairLogps(policy["chosen"], policy["rejected"], chosen_tokens=policy["chosen_tokens"],
                       rejected_tokens=policy["rejected_tokens"], weights=policy.get("wpo_weights"),
                       chosen_unweighted=-policy["chosen_nll_sum"] if self.dpo_cfg.ld_alpha is not None else None)
        if self.needs_reference:
            lp.ref_chosen, lp.ref_rejected = self.reference_logps(model, inputs)
        losses = combined_loss(self.loss_terms, lp, self.dpo_cfg)
        # num_items_in_batch is set only for token-budget batches (PackingTrainerMixin): pairs in the whole step.
        loss = losses.mean() if num_items_in_batch is None else (
            losses.sum() * self.current_gradient_accumulation_steps / num_items_in_batch)
        if model.training and self.state.global_step == 0 and self.step0_check is None and lp.ref_chosen is not None:
            self._check_step0(lp)
        self._store_metrics(lp, "train" if model.training else "eval")
        return (loss, policy) if return_outputs else loss

    def _feedback_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """compute_loss for ranked and unpaired batches: one forward over the prefix-shared lists."""
        policy, _ = list_logps(model, inputs)
        ref = None
        if self.needs_reference:
            ref = inputs.get("ref_logps")
            if ref is None:
                self.reference_forwards += 1
                with torch.no_grad():
                    if self.ref_model is not None:
                        ref = list_logps(self.ref_model, inputs)[0]
                    else:  # LoRA: the base model is the policy with its adapter switched off
                        with self.accelerator.unwrap_model(model).disable_adapter():
                            ref = list_logps(model, inputs)[0]
        lp = feedback_inputs(policy, ref, inputs)
        losses = combined_loss(self.loss_terms, lp, self.dpo_cfg)
        loss = losses.mean() if num_items_in_batch is None else (
            losses.sum() * self.current_gradient_accumulation_steps / num_items_in_batch)
        gather = self.accelerator.gather_for_metrics
        for name, (total, count) in feedback_metrics(lp, self.dpo_cfg.beta).items():
            total, count = gather(total.reshape(1)).sum(), gather(count.reshape(1)).sum()
            # NaN = this batch has none (e.g. no undesirable rows: no rewards/rejected); `log` averages the others.
            # A device tensor until a logging step reads it.
            mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
            self._stored["train" if model.training else "eval"][name].append(mean)
            self._sparse_metrics.add(name)
        return (loss, {"logps": policy}) if return_outputs else loss

    def _check_step0(self, lp: PairLogps) -> None:
        """At step 0 the policy is the reference, so every log-ratio is 0 and the DPO (sigmoid) loss is ln 2.
        A mismatch means the reference is another model, or the policy and reference see different inputs."""
        sig = REGISTRY["sigmoid"].fn(lp, self.dpo_cfg.model_copy(update={"label_smoothing": 0.0})).mean().item()
        # Half precision (bf16/fp16 autocast) sums thousands of rounded token log-probs, and the grad and no-grad
        # forwards may pick different attention kernels: a few 1e-3 of drift is numerics, not a wrong reference.
        half = self.args.bf16 or self.args.fp16
        tolerance = 5e-3 if half else 1e-4
        ok = abs(sig - math.log(2)) < tolerance
        self.step0_check = {"sigmoid_loss": sig, "ln2": math.log(2), "tolerance": tolerance,
                            "policy_equals_reference": ok}
        if ok:
            log.info("step-0 check: sigmoid loss %.6f = ln 2 (policy equals reference)", sig)
        else:
            log.warning("step-0 check: sigmoid loss %.6f != ln 2 = %.6f: the reference differs from the initial "
                        "policy (expected only with train.reference_model, or train.lora.init_from with reference: adapter)",
                        sig, math.log(2))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Checked once per optimizer step with the gradient norm (`_get_grad_norm`): no host sync per micro-batch.
        step_loss = loss.detach().float()
        self._step_loss = step_loss if self._step_loss is None else self._step_loss + step_loss
        return loss

    # Overridden (private, transformers 5.x Trainer, called right after clipping and before the optimizer step) to
    # check the step's loss and the total gradient norm clipping computed, with one host sync per optimizer step
    # instead of one per parameter; remove if Trainer passes grad_norm to `on_pre_optimizer_step`.
    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss, self._step_loss = self._step_loss, None
        check_finite_step(loss, None if self.args.fp16 else grad_norm, self.state.global_step)
        return grad_norm

    def _store_metrics(self, lp: PairLogps, mode: str) -> None:
        gather = self.accelerator.gather_for_metrics
        values = {"logps/chosen": lp.chosen.detach(), "logps/rejected": lp.rejected.detach()}
        if lp.ref_chosen is not None:
            chosen_r = self.dpo_cfg.beta * (lp.chosen - lp.ref_chosen).detach()
            rejected_r = self.dpo_cfg.beta * (lp.rejected - lp.ref_rejected).detach()
        else:  # reference-free losses: SimPO's implicit reward, beta * per-token mean log-prob
            chosen_r, rejected_r = (self.dpo_cfg.beta * v.detach() for v in lp.mean_logps())
        values.update({"rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
                       "rewards/accuracies": (chosen_r > rejected_r).float(), "rewards/margins": chosen_r - rejected_r})
        for name, tensor in values.items():  # device tensors, read at the next logging step (`log`)
            self._stored[mode][name].append(gather(tensor).float().mean())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time=None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        names = [name for name, values in self._stored[mode].items() if values]
        if names:  # (sum, count) of every metric read in one host sync
            rows = []
            for n in names:
                v = torch.stack(self._stored[mode][n]).float()
                seen = ~v.isnan() if n in self._sparse_metrics else torch.ones_like(v, dtype=torch.bool)
                rows.append(torch.stack([v.nan_to_num(0.0).sum() if n in self._sparse_metrics else v.sum(),
                                         seen.sum().float()]))
            sums = torch.stack(rows).tolist()
            logs.update({prefix + n: total / count for n, (total, count) in zip(names, sums) if count > 0})
        self._stored[mode].clear()
        loss = logs.get(prefix + "loss")
        if loss is not None and not math.isfinite(loss):
            raise UserError(
                f"training stopped: non-finite loss ({loss}) at step {self.state.global_step}; likely causes: "
                "learning rate too high, fp16 overflow (use bf16 or fp32), or empty responses after truncation"
            )
        super().log(logs, start_time)


def check_finite_step(loss: torch.Tensor | None, grad_norm, step: int) -> None:
    """Stops the run before the optimizer applies a step whose loss (the sum over its micro-batches) or total
    gradient norm is not finite: one fused check, one host sync. grad_norm None: loss only (fp16 runs leave
    non-finite gradients to the grad scaler, which skips such steps itself)."""
    flags = [] if loss is None else [torch.isfinite(loss).reshape(())]
    if grad_norm is not None:
        norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(float(grad_norm))
        flags.append(torch.isfinite(norm.detach()).reshape(()).to(flags[0].device if flags else norm.device))
    if not flags or bool(torch.stack(flags).all()):
        return
    if loss is not None and not bool(torch.isfinite(loss)):
        raise UserError(
            f"training stopped: non-finite loss ({loss.float().item()}) at step {step}; likely causes: "
            "learning rate too high, fp16 overflow (use bf16 or fp32), empty responses after truncation, or "
            "log(1 - p) underflow in orpo"
        )
    raise UserError(
        f"training stopped: non-finite gradient at step {step}; likely causes: learning rate too "
        "high, fp16 overflow (use bf16 or fp32), or inf/nan in the model weights; lower train.learning_rate "
        "or set train.max_grad_norm"
    )


class FiniteGradientCallback(TrainerCallback):
    """The finiteness check for trainers that are not dpokit's (the TRL engine): the total gradient norm from
    `torch._foreach_norm`, one host sync per optimizer step. dpokit's DPOTrainer checks the norm clipping computed."""

    def __init__(self, model):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if args.fp16:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads)
            total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device, torch.float32) for n in norms]))
            check_finite_step(None, total, state.global_step)


class SyncReferenceCallback(TrainerCallback):
    """TR-DPO (train.sync_reference; TRL's SyncRefModelCallback): after every `steps`-th optimizer step,
    reference <- alpha * policy + (1 - alpha) * reference, parameter by parameter (matched by name)."""

    def __init__(self, policy, reference, alpha: float, steps: int):
        self.policy, self.reference, self.alpha, self.steps = policy, reference, alpha, steps
        names = [n for n, _ in policy.named_parameters()]
        if names != [n for n, _ in reference.named_parameters()]:
            raise UserError("train.sync_reference: the reference model's parameters are not the policy's (another "
                            "architecture in train.reference_model?); use a reference of the policy's architecture, "
                            "or unset train.sync_reference")

    @torch.no_grad()
    def sync(self) -> None:
        for (_, ref), (_, pol) in zip(self.reference.named_parameters(), self.policy.named_parameters(), strict=True):
            ref.mul_(1.0 - self.alpha).add_(pol.to(ref.dtype), alpha=self.alpha)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps == 0:
            self.sync()


class MetricsFileCallback(TrainerCallback):
    """Appends every logged row to run_dir/metrics.jsonl (main process only), so curves survive a crash."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


def disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_reference_model(cfg: RunConfig):
    """train.reference_model, loaded with the policy's dtype, quantization and safety settings."""
    return load_model(cfg.train.reference_model, dtype=cfg.model.dtype,
                      trust_remote_code=cfg.model.trust_remote_code,
                      allow_pickle_weights=cfg.model.allow_pickle_weights,
                      quantization_config=bnb_config(cfg.model, cfg.train.precision))


def build_reference(cfg: RunConfig, model, reference: str):
    """The frozen reference model, or None when the adapter (LoRA) or precomputed log-probs stand in for it."""
    if reference in ("adapter", "none", "precomputed"):
        return None
    ref = load_reference_model(cfg) if cfg.train.reference_model else copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    return ref


def apply_lora(model, lora_cfg, target_modules=None):
    peft_cfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=target_modules or lora_cfg.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:
        raise UserError(f"train.lora.target_modules: {err}; list module names of this model (e.g. q_proj,v_proj)") from None


def load_lora(model, path: str):
    """train.lora.init_from: continue training an existing adapter (its own r, alpha and targets). The base weights
    stay the initial model's, so the disabled adapter is still that model (reference: adapter)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(Path(path).expanduser()), is_trainable=True)


CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")


def training_arguments(plan: TrainPlan, has_eval: bool) -> TrainingArguments:
    cfg, t = plan.cfg, plan.cfg.train
    return TrainingArguments(
        output_dir=str(plan.run_dir.checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        max_grad_norm=t.max_grad_norm,
        # transformers >= 5.x renamed it (the old name warns FutureWarning); older versions know only the old name.
        **{CHECKPOINTING_ARG: t.gradient_checkpointing},
        disable_tqdm=True,  # ConsoleCallback prints progress (when asked); no bar, no printed dicts
        bf16=plan.bf16,
        fp16=plan.fp16,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (t.eval_steps and has_eval) else "no",
        eval_steps=t.eval_steps or None,
        remove_unused_columns=False,
        dataloader_num_workers=t.num_workers,
        report_to=tracker_arguments(t.report_to, plan.run_dir.path / "logs"),  # "none" -> []
        use_cpu=no_accelerator(),  # CPU-only: lets torchrun / accelerate launch set up a gloo process group
        ddp_find_unused_parameters=False,  # every parameter takes part in the DPO forward
        # Trainer's NaN filter reads every micro-batch's loss on the host; a non-finite loss stops the run anyway
        # (DPOTrainer._get_grad_norm), so the filter would only cost a sync per micro-batch.
        logging_nan_inf_filter=False,
    )


@dataclass
class Setup:
    """Everything training needs, loaded and validated; nothing written yet."""

    model: object
    tokenizer: object
    data: PreferenceData
    train_enc: list[dict]
    eval_enc: list[dict]
    ref_model: object | None
    precomputed: dict | None
    processor: object | None = None  # vision-language runs: saved with the model
    images: list = field(default_factory=list)  # vision runs: (run-folder path, PIL image) of images without a file


def precompute_reference(cfg: RunConfig, model, tokenizer, train_enc, eval_enc, refresh: bool = False) -> dict:
    """reference: precomputed: attach cached (or freshly computed) reference log-probs to every pair; the reference
    model (the initial policy, or train.reference_model) is used here only, never during training."""
    rank, world = join_process_group()  # joins the launcher's process group now, so each rank uses its own GPU
    ref = load_reference_model(cfg) if cfg.train.reference_model else model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not is_quantized(ref):  # bitsandbytes placed a quantized model on its device as it loaded
        ref.to(device)
    info = precompute(ref, train_enc, eval_enc, pad_id=tokenizer.pad_token_id,
                      template=getattr(tokenizer, "chat_template", None), max_length=cfg.data.max_length,
                      batch_size=reference_batch_size(cfg), packing=cfg.train.packed, refresh=refresh,
                      rank=rank, world=world)
    del ref
    return info


def setup(plan: TrainPlan, refresh_reference: bool = False) -> Setup:
    """Tokenizer and data first (bad data fails in seconds, before the weights load), then the models."""
    cfg = plan.cfg
    # Before anything draws (LoRA's initial weights come before the Trainer seeds): identical configs, identical runs.
    set_seed(cfg.train.seed)
    apply_token_env(cfg.model)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, revision=cfg.model.revision,
                               trust_remote_code=cfg.model.trust_remote_code)
    data, train_enc, eval_enc = prepare_data(cfg, tokenizer)
    check_loss_kind(plan.loss_terms, data.kind)  # data.kind auto: the rows' kind is known only now
    model, tokenizer = load_model_and_tokenizer(cfg.model, tokenizer=tokenizer, precision=cfg.train.precision)
    if is_quantized(model):  # frozen base, fp32 norms, input gradients (for checkpointing): before any adapter
        model = prepare_for_kbit_training(model, cfg.model.name_or_path)
    if cfg.train.disable_dropout:
        disable_dropout(model)
    init_from = cfg.train.lora.init_from if cfg.train.lora is not None else None
    if init_from:  # before the reference: `precomputed` (and `model`) then see the policy as loaded, adapter on
        model = load_lora(model, init_from)
    precomputed = (precompute_reference(cfg, model, tokenizer, train_enc, eval_enc, refresh_reference)
                   if plan.reference == "precomputed" else None)
    ref_model = build_reference(cfg, model, plan.reference)
    if cfg.train.lora is not None:
        if not init_from:
            model = apply_lora(model, cfg.train.lora)
        if cfg.train.disable_dropout:
            disable_dropout(model)
    if cfg.train.gradient_checkpointing and cfg.train.lora is not None:
        model.enable_input_require_grads()
    return Setup(model, tokenizer, data, train_enc, eval_enc, ref_model, precomputed)


def setup_vision(plan: TrainPlan, refresh: bool = False) -> Setup:
    """setup() for image data: processor and data (every check) first, then the vision-language model, its vision
    tower frozen (train.freeze_vision), LoRA outside it, the reference as for text (`precomputed`: the pairs'
    fingerprint holds their pixel values, so other images are another cache entry)."""
    cfg = plan.cfg
    set_seed(cfg.train.seed)
    apply_token_env(cfg.model)
    v = prepare_vision_data(cfg)
    model = load_vision_model(cfg)
    if cfg.train.disable_dropout:
        disable_dropout(model)
    init_from = cfg.train.lora.init_from if cfg.train.lora is not None else None
    if init_from:
        model = load_lora(model, init_from)
    precomputed = (precompute_reference(cfg, model, v.processor.tokenizer, v.train_enc, v.eval_enc, refresh)
                   if plan.reference == "precomputed" else None)
    ref_model = build_reference(cfg, model, plan.reference)
    if cfg.train.lora is not None and not init_from:
        model = apply_lora(model, cfg.train.lora,
                           lora_targets(model, cfg.train.lora.target_modules, cfg.train.freeze_vision))
    if cfg.train.gradient_checkpointing and cfg.train.lora is not None:
        model.enable_input_require_grads()
    return Setup(model, v.processor.tokenizer, v.data, v.train_enc, v.eval_enc, ref_model, precomputed, v.processor,
                 v.images_to_save)


def write_run_start(plan: TrainPlan, s: Setup) -> None:
    """The run folder (main process only): manifest, resolved config and the exact data used, so eval and reports
    read only artifacts. The split is seeded, so every rank holds the same rows without reading them back."""
    if not is_main_process():
        return
    if plan.resume:
        plan.run_dir.write_config(plan.cfg)
    else:
        plan.run_dir.create(plan.cfg, replace=plan.replace_run_dir)  # --overwrite deletes only now, after setup
        plan.run_dir.metrics.unlink(missing_ok=True)
    plan.run_dir.write_images(s.images)  # before the rows that name them
    plan.run_dir.write_data(s.data.train, s.data.eval, s.data.report)
    held_out = held_out_reference_logps(s.eval_enc)
    if held_out is not None:
        plan.run_dir.write_reference_eval_logps(held_out)


def held_out_reference_logps(eval_enc: list[dict]) -> ReferenceEvalLogps | None:
    """The precomputed reference log-probs of the held-out pairs (None unless every held-out row is a pair that
    has them), for evaluation to reuse from the run folder."""
    if not eval_enc or not all("ref_chosen_logps" in p for p in eval_enc):
        return None
    return ReferenceEvalLogps(pairs_fingerprint=pairs_fingerprint(eval_enc),
                              chosen=[p["ref_chosen_logps"] for p in eval_enc],
                              rejected=[p["ref_rejected_logps"] for p in eval_enc])


def build_trainer(plan: TrainPlan, s: Setup, callbacks: list | None) -> Trainer:
    cfg = plan.cfg
    args = training_arguments(plan, has_eval=bool(s.eval_enc))
    if s.ref_model is not None and not is_quantized(s.ref_model):
        s.ref_model.to(args.device)
    if plan.vision:  # each pair once with its images once; the loss is DPOTrainer's as for text
        trainer = DPOTrainer(model=s.model, args=args, train_dataset=s.train_enc, eval_dataset=s.eval_enc or None,
                             processing_class=s.tokenizer, dpo_cfg=cfg.train, ref_model=s.ref_model,
                             data_collator=VisionPairCollator(s.tokenizer.pad_token_id))
        trainer.vision_share = share_frozen_tower(trainer.model, s.ref_model)  # None unless exact (frozen tower)
        trainer.attention_choice = {"backend": "dense", "passed_over": {}}
        if cfg.train.max_tokens_per_batch:  # a pair's length holds its prompt's image tokens
            trainer.token_budget_sampler = TokenBudgetBatchSampler(
                [pair_length(p) for p in s.train_enc], cfg.train.max_tokens_per_batch, seed=cfg.train.seed)
    elif cfg.train.engine == "trl":
        trainer = build_trl_trainer(cfg, s.model, s.tokenizer, args, s.train_enc, s.eval_enc, s.ref_model,
                                    plan.reference)
    else:
        # The Trainer first: it places the policy on the training device (FSDP and DeepSpeed place it when they
        # wrap it), so the collator's start-up self-check tests the kernels training will run (CUDA with LoRA too).
        trainer = DPOTrainer(model=s.model, args=args, train_dataset=s.train_enc, eval_dataset=s.eval_enc or None,
                             processing_class=s.tokenizer, dpo_cfg=cfg.train, ref_model=s.ref_model)
        autocast = torch.bfloat16 if plan.bf16 else torch.float16 if plan.fp16 else None  # the training's precision
        collator, budget_sampler = choose_collator(cfg.train, trainer.model, s.ref_model, s.train_enc,
                                                   s.tokenizer.pad_token_id, autocast=autocast)
        trainer.data_collator = collator
        trainer.token_budget_sampler = budget_sampler
        trainer.attention_choice = {"backend": collator.attention, "passed_over": collator.passed_over}
    # Printing is ConsoleCallback's (added by run_training when asked): a library call prints nothing.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    check_strategy(trainer)  # the launcher's FSDP / ZeRO really runs, or exit 2 before the first step
    trainer.add_callback(MetricsFileCallback(plan.run_dir.metrics))
    if not isinstance(trainer, DPOTrainer):  # DPOTrainer checks loss and gradient norm itself (_get_grad_norm)
        trainer.add_callback(FiniteGradientCallback(trainer.model))
    elif cfg.train.sync_reference is not None:  # engine: trl syncs with TRL's own callback (sync_ref_model)
        sync = cfg.train.sync_reference
        trainer.add_callback(SyncReferenceCallback(trainer.model, s.ref_model, sync.alpha, sync.steps))
        trainer.synced_reference = s.ref_model  # checkpointed with the weights (AtomicCheckpointMixin)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    return trainer


def fit(plan: TrainPlan, trainer: Trainer, console: ConsoleCallback | None = None):
    """trainer.train(), resuming from the last complete checkpoint, stopping cleanly on SIGINT/SIGTERM.
    Returns (TrainOutput, the checkpoint resumed from or None)."""
    checkpoint = last_complete_checkpoint(plan.run_dir.checkpoints) if plan.resume else None
    if checkpoint:
        clean_staging(plan.run_dir.checkpoints)
        trim_metrics(plan.run_dir.metrics, checkpoint_step(checkpoint))
        restore_loss_sum(trainer, checkpoint)
        restore_synced_reference(trainer, checkpoint)
    if console is not None:
        console.checkpoint = checkpoint
        trainer.add_callback(console)
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    stopper.install()
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        stopper.uninstall()
    if stopper.received is not None:
        raise TrainingStopped(
            f"training stopped by {stopper.signal_name} at step {trainer.state.global_step}; checkpoint saved in "
            f"{last_complete_checkpoint(plan.run_dir.checkpoints)}; continue with: dpokit train CONFIG --resume",
            stopper.received)
    return output, checkpoint


def library_versions() -> dict[str, str]:
    import platform

    import peft
    import transformers

    from dpokit import __version__

    return {"dpokit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def selection_callback(plan: TrainPlan, s: Setup) -> SelectionCallback | None:
    """train.select: best_judge (main process; the plan allows one process only): the callback that evaluates the
    planned steps with the judge. None for select: last."""
    if plan.select != "best_judge" or not s.data.eval or not is_main_process():
        return None
    checkpoint = last_complete_checkpoint(plan.run_dir.checkpoints) if plan.resume else None
    return SelectionCallback(plan.cfg, plan.run_dir, s.tokenizer, s.data.eval, ref_model=s.ref_model,
                             resume_step=checkpoint_step(checkpoint) if checkpoint else None)


def save(plan: TrainPlan, s: Setup, trainer: Trainer, output, wall: float, checkpoint: str | None = None,
         selection: SelectionCallback | None = None) -> dict:
    run_dir = plan.run_dir
    record = None
    if selection is not None:  # the kept point's weights into the model before it is saved
        record = selection.finish(trainer.model, trainer.state.global_step, trainer.state.epoch)
    if plan.cfg.output.save_model:
        # Every rank calls save_model (FSDP / ZeRO-3 gather the shards); Trainer writes from rank 0 only.
        with quiet_hf(logs=False):  # no "Writing model shards" bar; transformers' warnings stay visible
            trainer.save_model(str(run_dir.model_dir))
        if trainer.is_world_process_zero():
            (s.processor or s.tokenizer).save_pretrained(str(run_dir.model_dir))
            (run_dir.model_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: we write JSON instead
            chmod_tree_as_created(run_dir.model_dir)
    final = dict(output.metrics)
    final["train_loss"] = whole_run_train_loss(trainer, final.get("train_loss"))
    distributed = distributed_summary(trainer, trainer.model)  # a collective: every rank
    if trainer.is_world_process_zero():
        with contextlib.suppress(OSError):  # Trainer makes checkpoints/ even when it saves none (save_steps 0)
            run_dir.checkpoints.rmdir()
        run_dir.write_training_args(trainer.args.to_json_string())
        run_dir.write_train_summary(TrainSummary(
            metrics=final, wall_seconds=wall, global_step=trainer.state.global_step, reference=plan.reference,
            engine=plan.cfg.train.engine,
            reference_forwards={"precompute": s.precomputed["forwards"] if s.precomputed else 0,
                                "training": getattr(trainer, "reference_forwards", None)},
            reference_cache=s.precomputed, step0_check=getattr(trainer, "step0_check", None),
            pairs_trained=len(s.train_enc), precision="bf16" if plan.bf16 else "fp16" if plan.fp16 else "fp32",
            attention=getattr(trainer, "attention_choice", None),
            versions=library_versions(), finished=time.time(),
            resumed_from=Path(checkpoint).name if checkpoint else None, distributed=distributed,
            select=plan.select, kept_step=record.kept_step if record else None,
            selection_seconds=record.seconds if record else None))
        if record is not None:  # model/ holds the kept weights now
            shutil.rmtree(run_dir.selection_dir, ignore_errors=True)
    return final


def selection_line(record, wall: float) -> str:
    """One line for the console: the kept step, its win rate against the base, and what the selection cost."""
    kept = next((p for p in record.points if p.step == record.kept_step), None)
    if kept is None:
        return "selection: no point evaluated; the last step is the run's model"
    low, high = kept.win_rate.ci
    share = record.seconds / wall if wall > 0 else 0.0
    which = "the last step" if kept.step == record.final_step else f"step {kept.step} of {record.final_step}"
    return (f"selection: kept {which} (win rate vs base {kept.win_rate.value:.2f} [{low:.2f}, {high:.2f}] on "
            f"{len(record.prompts)} held-out prompts, {len(record.points)} points evaluated); cost "
            f"{record.seconds:.1f} s ({share:.0%} of the training wall time)")


def run_training(cfg: RunConfig | TrainPlan, resume: bool = False, callbacks: list | None = None,
                 refresh_reference: bool = False, progress: bool = False) -> TrainResult:
    """Train as the config says: plan -> setup -> fit -> save. Evaluation is the caller's next step
    (`dpokit.evaluate(result.run_dir)`; the CLI chains it when eval.enabled).

    `cfg`: a RunConfig, or a TrainPlan from `plan_training` (the CLI plans first, to check the judge as well).
    `callbacks`: extra transformers TrainerCallbacks (API users; the tests stop a run midway with one).
    `refresh_reference`: recompute precomputed reference log-probs even when the cache has them.
    `progress`: print the start header, a line per logging step and the step-0 check (the CLI's default)."""
    start = time.time()
    quiet_non_main_process()
    plan = cfg if isinstance(cfg, TrainPlan) else plan_training(cfg, resume=resume)
    threads = apply_num_threads(plan.cfg.train.num_threads)
    s = setup_vision(plan, refresh_reference) if plan.vision else setup(plan, refresh_reference)
    # After setup: bad data has failed by now with its one line. The sample excludes this process's own CPU time.
    if progress and not torch.cuda.is_available():
        warning = oversubscription_warning(threads, cpu_load_of_others())
        if warning:
            print(warning, file=sys.stderr, flush=True)
    write_run_start(plan, s)
    selection = selection_callback(plan, s)
    trainer = build_trainer(plan, s, [*(callbacks or []), *([selection] if selection else [])])
    console = ConsoleCallback(plan, s, trainer) if progress else None
    output, checkpoint = fit(plan, trainer, console)
    final = save(plan, s, trainer, output, time.time() - start, checkpoint, selection)
    if progress and selection is not None and selection.record is not None:
        print(selection_line(selection.record, time.time() - start), flush=True)
    destroy_process_group_at_exit()  # launched runs: no gloo teardown left to interpreter shutdown (SIGABRT)
    return TrainResult(run_dir=plan.run_dir.path, final_metrics=final, wall_seconds=time.time() - start,
                       evaluate=plan.evaluate and bool(s.data.eval))
