"""`dpokit plan`'s resource planner: per-device peak memory and time per epoch, with what to change when a run does
not fit. The arithmetic is in `dpokit.train.estimate`; `dpokit.train.measure` runs real steps to compare. The static
checks a plan also runs are `dpokit.train.plan.plan_training`'s, the same as `dpokit train`'s."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import torch

from dpokit.core.config import RunConfig
from dpokit.core.errors import UserError
from dpokit.train import estimate as est
from dpokit.train.plan import plan_training


def plan_resources(cfg: RunConfig, *, gpus: int = 1, gpu_memory_mb: float | None = None, sharding: str = "none",
                   tflops: float | None = None, origin: str = "config", resume: bool = False,
                   evaluate: bool | None = None):
    """`dpokit plan`: per-device peak memory and time per epoch (dpokit.train.estimate), with what to change when
    the run does not fit. Reads the model's config, the tokenizer and the data; loads no weights.

    The target is a GPU when `gpu_memory_mb` is given or one is present, else this machine's CPU, whose limit is
    the memory available now. Every static check of `dpokit train` runs first (`plan_training`), so a plan that
    passes means training will not stop at planning."""
    if gpus < 1:
        raise UserError(f"--gpus: {gpus} is not a number of devices; give 1 or more")
    if sharding not in est.SHARDING:
        raise UserError(f"--shard: unknown {sharding!r}; use one of {', '.join(est.SHARDING)}")
    if tflops is not None and not tflops > 0:
        raise UserError(f"--tflops: {tflops} is not a throughput; give a positive number (TFLOP/s per device)")
    plan = plan_training(cfg, resume=resume, evaluate=evaluate, origin=origin)
    reference = plan.reference
    if sharding == "zero3" and cfg.model.quantization != "none":
        raise UserError(f"--shard zero3: bitsandbytes' {cfg.model.quantization} weights cannot be sharded; plan with "
                        "--shard none or zero2 (each device holds the quantized base), or model.quantization: none")
    device = "cuda" if gpu_memory_mb is not None or torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if gpu_memory_mb is None:
            gpu_memory_mb = torch.cuda.get_device_properties(0).total_memory / est.MB
        flops = est.DEFAULT_FLOPS["cuda"]
        process_mb = 0.0
    else:
        gpu_memory_mb = _available_ram_mb()
        flops = est.DEFAULT_FLOPS["cpu_per_core"] * torch.get_num_threads()
        process_mb = training_process_mb()
    target = est.Target(device=device, gpus=gpus, memory_mb=gpu_memory_mb, process_mb=process_mb,
                        flops_per_second=tflops * 1e12 if tflops else flops, sharding=sharding)
    shape = est.model_shape(cfg, vision=plan.vision)
    lengths = est.data_lengths(cfg, shape.vision)
    result = est.estimate(cfg, shape, lengths, target, reference)
    if result.fits is False:
        result.suggestions = est.suggestions(cfg, shape, lengths, target, reference, result)
    return result


@functools.lru_cache(maxsize=1)
def training_process_mb() -> float:
    """Resident memory of a training process before its first tensor: the interpreter with torch, transformers,
    peft, accelerate and dpokit's training stack imported (about 860 MB with torch 2.14 on x86_64). Measured in a
    fresh interpreter that imports what `dpokit train` imports, so it follows this machine's builds of those
    libraries and not whatever the caller's process (a notebook, a test runner) holds besides. On the CPU the
    device is the host, so this is part of the peak the user sees.

    That import takes seconds (10 s on a 2-core CPU), so the figure is kept in dpokit's cache under the interpreter
    and the versions of the libraries it imports; another interpreter or any upgrade measures again."""
    import json

    from dpokit.core.io import atomic_write_text
    from dpokit.core.models import cache_dir

    path, key = cache_dir() / "training_process_mb.json", _training_stack_key()
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
            return float(known[key])
    except (OSError, ValueError):
        known = {}
    measured = _measure_training_process_mb()
    try:
        atomic_write_text(path, json.dumps({**(known if isinstance(known, dict) else {}), key: measured}, indent=1))
    except OSError:   # a read-only cache only costs the next plan the same measurement
        pass
    return measured


def _training_stack_key() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    libraries = ("dpokit", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "trl")
    return " ".join([sys.executable, sys.version.split()[0], *(f"{n}={installed(n)}" for n in libraries)])


def _measure_training_process_mb() -> float:
    code = ("import gc, psutil, dpokit.train.trainer; gc.collect(); "
            "print(psutil.Process().memory_info().rss)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"dpokit plan: could not import the training stack in a fresh process ({tail[:300]}); "
                        "run `python -c 'import dpokit.train.trainer'` to see the error")
    return int(proc.stdout.split()[-1]) / est.MB


def _available_ram_mb() -> float:
    """The memory a new training process could take now: available RAM plus what this planning process holds,
    which it gives back when it exits."""
    import psutil

    return (psutil.virtual_memory().available + psutil.Process().memory_info().rss) / est.MB
