"""Training: losses, batching, reference log-probs and the Trainer subclass. Entry: `trainer.run_training`, after
`plan.plan_training` has checked the run."""

import sys
import types
import warnings


class _CallablePackage(types.ModuleType):
    """Deprecated: `dpokit.train(config)` was the API's training function until 0.1; the name now belongs to this
    package (so `import dpokit.train.packing` works). Calling the package still trains, with a warning, and no
    longer evaluates. Remove in 0.3."""

    def __call__(self, config, **kwargs):
        from dpokit.core.config import RunConfig, load_config
        from dpokit.train.trainer import run_training

        warnings.warn("dpokit.train(config) is deprecated; use dpokit.run_training(config), then "
                      "dpokit.evaluate(result.run_dir)", DeprecationWarning, stacklevel=2)
        return run_training(config if isinstance(config, RunConfig) else load_config(config), **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
