"""dpokit: Direct Preference Optimization on the Hugging Face stack.

Pipeline: data -> train -> eval -> report. Each stage has one entry function:

    from dpokit import load_config, train, evaluate
    cfg = load_config("configs/tiny.yaml")
    result = train(cfg)            # -> TrainResult(run_dir, ...)
    metrics = evaluate(result.run_dir)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dpokit")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

# The subpackages dpokit.train / dpokit.eval must be imported before the functions below are defined: importing a
# subpackage later would rebind the attribute `dpokit.train` to the module and hide the function.
import importlib as _importlib  # noqa: E402

from dpokit.config import RunConfig, load_config  # noqa: E402
from dpokit.errors import UserError  # noqa: E402

for _sub in ("train", "eval", "data"):
    _importlib.import_module(f"dpokit.{_sub}")


def train(config, **kwargs):
    """Train with DPO from a `RunConfig` (or a path to a YAML file). See `dpokit.train.trainer.run_training`."""
    from dpokit.train.trainer import run_training

    if not isinstance(config, RunConfig):
        config = load_config(config)
    return run_training(config, **kwargs)


def evaluate(run_dir, **kwargs):
    """Evaluate a finished run folder. See `dpokit.eval.evaluate_run`."""
    from dpokit.eval import evaluate_run

    return evaluate_run(run_dir, **kwargs)


__all__ = ["RunConfig", "UserError", "__version__", "evaluate", "load_config", "train"]
