"""dpokit: Direct Preference Optimization on the Hugging Face stack.

Pipeline: data -> train -> eval -> report. Each stage has one entry function:

    import dpokit
    cfg = dpokit.load_config("configs/tiny.yaml")
    result = dpokit.run_training(cfg)          # -> TrainResult(run_dir, ...)
    metrics = dpokit.evaluate(result.run_dir)  # -> EvalResult, also written to RUN_DIR/eval.json

The names below are resolved on first use, so `import dpokit` (and `dpokit --version`) loads no torch.
"""

import os
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

# PyTorch's OpenMP threads spin-wait between parallel regions by default: when another process uses the CPUs, the
# spinning threads steal the cores the working ones need (a matmul loop ran 7x slower beside a second process here,
# 4.4 s vs 30 s). Passive waiting costs little on idle CPUs. Read by libgomp when torch loads, so it is set before
# any torch import; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _quiet_bitsandbytes_hub_kernel_fallback() -> None:
    """Workaround: bitsandbytes 0.50 on a CPU with AVX512-BF16 asks the `kernels` package, as it is imported, for
    the hub kernel kernels-community/quantization-bitsandbytes; offline, or where the publisher is not trusted, it
    logs two WARNING lines and falls back to its own CPU kernel (the same results). peft imports bitsandbytes
    whenever it is installed, so every dpokit command printed those lines, even a one-line error. Only these two
    messages are dropped. Remove when bitsandbytes loads hub kernels on request only or logs this at DEBUG."""
    import logging

    def drop(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
                    or message.startswith("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"))

    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).addFilter(drop)


_quiet_bitsandbytes_hub_kernel_fallback()

try:
    __version__ = version("dpokit")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

# Public name -> "module:attribute". None of them is a subpackage name, so `import dpokit.train.packing` works.
_API = {
    "RunConfig": "dpokit.core.config:RunConfig",
    "load_config": "dpokit.core.config:load_config",
    "UserError": "dpokit.core.errors:UserError",
    "RunDir": "dpokit.core.run:RunDir",
    "plan_training": "dpokit.train.plan:plan_training",
    "run_training": "dpokit.train.trainer:run_training",
    "evaluate": "dpokit.eval:evaluate_run",
}


_SUBPACKAGES = ("core", "data", "train", "eval", "cli")


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # `dpokit.train` before anything imported it
        return import_module(f"dpokit.{name}")
    if name not in _API:
        raise AttributeError(f"module 'dpokit' has no attribute {name!r}")
    module, _, attr = _API[name].partition(":")
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
