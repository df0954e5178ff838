"""Measure a few real training steps of a config: peak memory and seconds per optimizer step (`dpokit plan --measure`).

Each measurement runs in a fresh Python process (`python -m dpokit.train.measure SPEC.json`), so earlier work in the
caller's process cannot raise its peak. The child imports the whole training stack first, then takes its baseline:

- CPU: the process's peak resident memory, what `/usr/bin/time -v` reports and what the plan's total (with its
  `process` line) predicts. After the imports the child resets the kernel's high-water mark
  (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), so transient peaks while importing do not count, and reads
  `VmHWM` from /proc/self/status at the end. The RSS after the imports is reported as `baseline_mb`.
- CUDA: `torch.cuda.max_memory_allocated()` plus the CUDA context (device memory in use before training that the
  allocator does not hold), as the plan counts them.

Time: the mean wall time of the optimizer steps after the first (the first pays for lazy initialisation).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from dpokit.core.config import RunConfig
from dpokit.core.errors import UserError


def _status_kib(key: str) -> int | None:
    """A field of /proc/self/status in KiB. Read by hand for VmHWM: psutil has no resident high-water mark, and
    resource.getrusage's ru_maxrss does not see the reset below."""
    try:
        text = Path("/proc/self/status").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
        return True
    except OSError:
        return False


def measurement_config(cfg: RunConfig, steps: int, out_dir: str) -> RunConfig:
    """The run as configured, cut to `steps` optimizer steps into a scratch folder: no checkpoints, no saved model,
    no evaluation, so the numbers are training's own."""
    train = cfg.train.model_copy(update={"max_steps": steps, "save_steps": 0, "eval_steps": 0, "report_to": "none",
                                         "logging_steps": 1})
    return cfg.model_copy(update={
        "train": train,
        "eval": cfg.eval.model_copy(update={"enabled": False}),
        "output": cfg.output.model_copy(update={"dir": out_dir, "overwrite": True, "save_model": False}),
    })


def measure(cfg: RunConfig, steps: int = 3, timeout: float = 3600) -> dict:
    """Run `steps` optimizer steps of `cfg` in a fresh process; returns {device, peak_memory_mb, baseline_mb, method,
    seconds_per_step, steps}."""
    if steps < 2:
        raise UserError(f"--measure-steps: {steps} is too few; give at least 2 (the first step is not timed)")
    with tempfile.TemporaryDirectory(prefix="dpokit-measure-") as tmp:
        spec = Path(tmp) / "spec.json"
        run_cfg = measurement_config(cfg, steps, str(Path(tmp) / "run"))
        spec.write_text(json.dumps({"config": run_cfg.model_dump(mode="json"), "steps": steps}), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "dpokit.train.measure", str(spec)], capture_output=True,
                              text=True, timeout=timeout, env=dict(os.environ))
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("MEASURED ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--measure: the training steps failed ({tail[:300]}); run `dpokit train` on the config to "
                        "see the full error")
    return json.loads(line[len("MEASURED "):])


def _child(spec_path: str) -> dict:
    import gc

    import torch
    from transformers import TrainerCallback

    from dpokit.core.config import config_from_dict
    from dpokit.train.trainer import run_training

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    cfg = config_from_dict(spec["config"], "measure")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    cuda = torch.cuda.is_available()
    gc.collect()
    baseline_kib = psutil.Process().memory_info().rss / 1024
    reset = _reset_peak_rss()
    if cuda:
        torch.zeros(1, device="cuda")  # creates the CUDA context, so it can be measured before training
        free, total = torch.cuda.mem_get_info()
        context_mb = (total - free - torch.cuda.memory_reserved()) / 2**20
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer()
    run_training(cfg, callbacks=[timer])
    if cuda:  # per device, as planned: the allocator's peak plus the context (its own line in the plan)
        peak_mb, base_mb = torch.cuda.max_memory_allocated() / 2**20 + context_mb, context_mb
        method = "torch.cuda.max_memory_allocated + the CUDA context (mem_get_info before training)"
    else:  # the whole process, as planned: on the CPU the host is the device
        peak_mb = (_status_kib("VmHWM") or 0) / 1024
        base_mb = baseline_kib / 1024
        method = ("peak resident memory (VmHWM; high-water mark reset after the imports)" if reset
                  else "peak resident memory (VmHWM, imports included)")
    timed = timer.times[1:] or timer.times
    return {"device": "cuda" if cuda else "cpu", "peak_memory_mb": round(peak_mb, 1), "baseline_mb": round(base_mb, 1),
            "method": method, "steps": len(timer.times),
            "seconds_per_step": round(sum(timed) / len(timed), 4) if timed else None}


if __name__ == "__main__":
    print("MEASURED " + json.dumps(_child(sys.argv[1])), flush=True)
