"""CLI command `dpokit plan`: will the run fit, and how long will an epoch take? Registered on the app by cli.py."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dpokit.core.config import checked_overrides
from dpokit.core.errors import UserError


def plan(
    config: Annotated[str, typer.Argument(help="Run config YAML, e.g. configs/tiny.yaml")],
    gpus: Annotated[int, typer.Option("--gpus", help="Devices (processes) the run will use.")] = 1,
    gpu_memory: Annotated[str | None, typer.Option(
        "--gpu-memory", help="Memory per GPU, e.g. 80GB or 24000MB; plans for a GPU. Default: this machine's GPU, "
        "else its CPU and the RAM available now.")] = None,
    shard: Annotated[str, typer.Option(
        "--shard", help="none (DDP), zero2 (optimizer state and gradients sharded) or zero3 (ZeRO-3 / FSDP full "
        "shard: weights too).")] = "none",
    tflops: Annotated[float | None, typer.Option(
        "--tflops", help="Achieved training throughput per device in TFLOP/s (default: an assumption per device; "
        "--measure measures it).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON on stdout.")] = False,
    measure: Annotated[bool, typer.Option("--measure", help="Also run a few real training steps (fresh process, "
                                          "scratch folder) and show predicted vs measured.")] = False,
    measure_steps: Annotated[int, typer.Option(help="Optimizer steps for --measure (the first is not timed).")] = 3,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", callback=checked_overrides, help="Override a config key: --set section.key=value (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Plan as `dpokit train --overwrite`: an existing "
                                            "run folder will be replaced.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Plan as `dpokit train --resume`.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Plan as `dpokit train --no-eval` (the judge is "
                                          "then not checked).")] = False,
) -> None:
    """Estimate per-device peak memory and time per epoch from the config, tokenizer and data (no weights loaded);
    when the run will not fit, say what to change."""
    # Flags first: a typo fails in a second, before the tokenizer and data are read.
    if gpus < 1:
        raise UserError(f"--gpus: {gpus} is not a number of devices; give 1 or more")
    if measure and measure_steps < 2:
        raise UserError(f"--measure-steps: {measure_steps} is too few; give at least 2 (the first is not timed)")
    from dpokit.core.config import load_config
    from dpokit.train.estimate import parse_memory
    from dpokit.train.resources import plan_resources

    memory_mb = parse_memory(gpu_memory) if gpu_memory is not None else None
    cfg = load_config(config, list(set_ or []) + (["output.overwrite=true"] if overwrite else []), check_files=False)
    # Every static check of `dpokit train` with the same flags runs inside, before the tokenizer and data are read.
    result = plan_resources(cfg, gpus=gpus, gpu_memory_mb=memory_mb, sharding=shard, tflops=tflops, origin=config,
                            resume=resume, evaluate=False if no_eval else None)
    out = result.to_dict()
    if measure:
        from dpokit.train.measure import measure as run_measure

        measured = run_measure(cfg, steps=measure_steps)
        predicted_step = result.seconds_per_epoch / max(result.time["steps_per_epoch"], 1)
        out["measured"] = {**measured, "predicted_peak_memory_mb": result.peak_memory_mb,
                           "memory_ratio": round(measured["peak_memory_mb"] / result.peak_memory_mb, 3),
                           "predicted_seconds_per_step": round(predicted_step, 3)}
        if measured.get("seconds_per_step"):
            seconds = measured["seconds_per_step"] * result.time["steps_per_epoch"]
            out["measured"]["seconds_per_epoch"] = round(seconds, 1)
            out["measured"]["flops_per_second_per_device"] = round(result.time["flops_per_epoch"] / seconds / gpus)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        typer.echo(format_plan(out))


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_plan(out: dict) -> str:
    st, tm = out["settings"], out["time"]
    where = f"{st['gpus']} x {st['device']}" + (f" ({st['sharding']})" if st["sharding"] != "none" else "")
    limit = out["memory_limit_mb"]
    verdict = ("fits" if out["fits"] else "DOES NOT FIT") if out["fits"] is not None else "limit unknown"
    lines = [f"plan for {where}: {'LoRA' if st['lora'] else 'full fine-tune'}, reference {st['reference']}, "
             f"{st['trainable_params']:,} trainable of {st['params']:,} parameters",
             f"peak memory per device: {out['peak_memory_mb']:,.0f} MB"
             + (f" of {limit:,.0f} MB: {verdict}" if limit else ""),
             *(f"  {name:24s} {mb:>10,.1f} MB" for name, mb in out["breakdown_mb"].items()),
             f"  largest batch: {st['largest_batch']['pairs']} pairs in {st['largest_batch']['rows']} rows x "
             f"{st['largest_batch']['width']} tokens",
             f"time per epoch: {_seconds(out['seconds_per_epoch'])} ({tm['steps_per_epoch']} steps, "
             f"{tm['tokens_per_epoch']:,} tokens, {tm['flops_per_epoch']:.3g} FLOPs at "
             f"{tm['flops_per_second_per_device'] / 1e12:.3g} TFLOP/s per device)"]
    if "precompute_seconds" in tm:
        lines.append(f"  plus the reference precompute, once: {_seconds(tm['precompute_seconds'])}")
    if out["suggestions"]:
        lines.append("to make it fit, change one of (estimated peak with that change):")
        lines += [f"  {s['peak_memory_mb']:>10,.0f} MB {'fits' if s['fits'] else '    '}  {s['change']}"
                  for s in out["suggestions"]]
    m = out.get("measured")
    if m:
        lines.append(f"measured ({m['steps']} steps, {m['device']}; {m['method']}): peak {m['peak_memory_mb']:,.0f} MB "
                     f"vs predicted {m['predicted_peak_memory_mb']:,.0f} MB (ratio {m['memory_ratio']})")
        if m.get("seconds_per_step"):
            lines.append(f"  {m['seconds_per_step']:.3g} s per step vs predicted {m['predicted_seconds_per_step']:.3g}; "
                         f"epoch {_seconds(m['seconds_per_epoch'])} at the measured "
                         f"{m['flops_per_second_per_device'] / 1e12:.3g} TFLOP/s (pass --tflops to plan with it)")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
