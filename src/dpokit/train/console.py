"""What `dpokit train` prints while it trains: a start header, one line of numbers per logging step, the step-0
check, and nothing from transformers' own progress bar or dict printer.

Library calls print nothing: `run_training(..., progress=True)` adds `ConsoleCallback`; the CLI asks for it unless
`--quiet`. Lines go to stdout through plain `print`, so they read the same in a terminal, a log file and CI.
"""

from __future__ import annotations

from transformers import TrainerCallback

# (log key, label, format) in the order a line shows them; keys a row lacks are left out.
STEP_FIELDS = (
    ("loss", "loss", "{:.4f}"),
    ("rewards/accuracies", "acc", "{:.2f}"),
    ("rewards/margins", "margin", "{:.3f}"),
    ("logps/chosen", "chosen", "{:.1f}"),
    ("logps/rejected", "rejected", "{:.1f}"),
    ("learning_rate", "lr", "{:.2e}"),
    ("grad_norm", "grad", "{:.3g}"),
    ("epoch", "epoch", "{:.2f}"),
)


def format_step(logs: dict, step: int, max_steps: int, prefix: str = "") -> str:
    """One line: `step   12/72  loss 0.6761  acc 0.69 ...` (eval rows: `eval at step 12  loss ...`)."""
    width = len(str(max_steps))
    head = f"eval at step {step}" if prefix else f"step {step:>{width}}/{max_steps}"
    parts = [head]
    for key, label, fmt in STEP_FIELDS:
        value = logs.get(prefix + key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {fmt.format(value)}")
    return "  ".join(parts)


def describe_run(plan, setup, checkpoint: str | None, resumed_step: int, max_steps: int) -> list[str]:
    """The start header: what is about to happen, from the plan and the loaded setup."""
    cfg, t = plan.cfg, plan.cfg.train
    how = "full fine-tune"
    if t.lora is not None:
        targets = t.lora.target_modules
        how = f"LoRA r={t.lora.r} alpha={t.lora.alpha} on {', '.join(targets) if isinstance(targets, list) else targets}"
        if t.lora.init_from:
            how = f"LoRA continued from {t.lora.init_from}"
    precision = "bf16" if plan.bf16 else "fp16" if plan.fp16 else "fp32"
    attention = cfg.model.attn_implementation or "default attention"
    layout = "packed, prefix-shared" if t.packed else "padded batches"
    steps = f"{max_steps} steps"
    if t.max_steps and t.max_steps > 0:
        steps += " (train.max_steps)"
    else:
        steps += f" ({t.epochs:g} epochs x {len(setup.train_enc)} rows, batch {t.batch_size} x accum {t.grad_accum})"
    lines = [
        f"dpokit train: {cfg.model.name_or_path}, {how}",
        f"  loss {t.loss} (beta {t.beta:g}), reference: {plan.reference}, lr {t.learning_rate:g}",
        f"  data: {len(setup.train_enc)} train rows, {len(setup.eval_enc)} held out, from {cfg.data.source}",
        f"  {steps}; {precision}, {attention}, {layout}",
        f"  run folder: {plan.run_dir.path}",
    ]
    if checkpoint:
        lines.append(f"  resumed from {checkpoint} (step {resumed_step} of {max_steps})")
    return lines


def format_step0(check: dict) -> str:
    if check["policy_equals_reference"]:
        return (f"step-0 check: sigmoid loss {check['sigmoid_loss']:.6f} = ln 2 within {check['tolerance']:g}: "
                "the reference equals the initial policy")
    return (f"step-0 check: sigmoid loss {check['sigmoid_loss']:.6f} != ln 2 ({check['ln2']:.6f}): the reference "
            "differs from the initial policy (expected only with train.reference_model, or train.lora.init_from "
            "with reference: adapter)")


class ConsoleCallback(TrainerCallback):
    """Prints the header at train begin, a line per log, the step-0 check once; main process only."""

    def __init__(self, plan, setup, trainer, checkpoint: str | None = None):
        self.plan, self.setup, self.trainer, self.checkpoint = plan, setup, trainer, checkpoint
        self.step0_printed = False

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print("\n".join(describe_run(self.plan, self.setup, self.checkpoint, state.global_step, state.max_steps)),
                  flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return  # the closing summary reports the totals
        prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
        print(format_step(logs, state.global_step, state.max_steps, prefix), flush=True)
        check = getattr(self.trainer, "step0_check", None)
        if check and not self.step0_printed:
            self.step0_printed = True
            print(format_step0(check), flush=True)
