"""Experiment trackers (`train.report_to`): the names transformers' Trainer reports to, checked before training.

`report_to_list(value)` normalises the config value to the list `TrainingArguments(report_to=...)` takes ("none" ->
[]); `check_report_to(value)` returns one problem per unknown tracker name or tracker whose package is missing, so
the training plan can report them with every other problem before any weights load.
"""

from __future__ import annotations

# Tracker -> (module whose presence transformers checks, what to install). Names transformers knows but that are
# not listed here are accepted with transformers' own availability check and a generic hint.
_PACKAGES: dict[str, str] = {
    "azure_ml": "azureml-core",
    "clearml": "clearml",
    "codecarbon": "codecarbon",
    "comet_ml": "comet_ml",
    "dagshub": "dagshub",
    "dvclive": "dvclive",
    "flyte": "flytekit flytekitplugins-deck-standard",
    "mlflow": "mlflow",
    "neptune": "neptune",
    "swanlab": "swanlab",
    "tensorboard": "tensorboard",
    "trackio": "trackio",
    "wandb": "wandb",
}
# Trackers that are "available" through the environment rather than a package.
_ENV_HINTS: dict[str, str] = {
    "kubeflow": "runs only under a Kubeflow trainer (KUBEFLOW_TRAINER_SERVER_URL set)",
}
# transformers' availability function per tracker name (in transformers.integrations.integration_utils).
_AVAILABLE_FN: dict[str, str] = {
    "azure_ml": "is_azureml_available",
    "clearml": "is_clearml_available",
    "codecarbon": "is_codecarbon_available",
    "comet_ml": "is_comet_available",
    "dagshub": "is_dagshub_available",
    "dvclive": "is_dvclive_available",
    "flyte": "is_flyte_deck_standard_available",
    "kubeflow": "is_kubeflow_available",
    "mlflow": "is_mlflow_available",
    "neptune": "is_neptune_available",
    "swanlab": "is_swanlab_available",
    "tensorboard": "is_tensorboard_available",
    "trackio": "is_trackio_available",
    "wandb": "is_wandb_available",
}


def _names(value: list[str] | str | None) -> list[str]:
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    return [str(n).strip() for n in names if str(n).strip()]


def report_to_list(value: list[str] | str | None) -> list[str]:
    """The config value as `TrainingArguments.report_to` takes it: "none" (or None, or []) -> [], a name -> [name];
    "all" -> ["all"] (every installed tracker, as transformers resolves it). A comma-separated string is split."""
    return [n for n in _names(value) if n != "none"]


def known_trackers() -> list[str]:
    """Tracker names the installed transformers supports."""
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # pragma: no cover - layout of another transformers version
        return sorted(_AVAILABLE_FN)
    return list(INTEGRATION_TO_CALLBACK)


def _available(name: str) -> bool:
    import transformers.integrations.integration_utils as integrations

    fn = getattr(integrations, _AVAILABLE_FN.get(name, f"is_{name}_available"), None)
    if fn is None:
        return True  # transformers will say so itself when the callback starts
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - an availability probe must not crash the plan
        return False


def check_report_to(value: list[str] | str | None) -> list[str]:
    """Problems with `train.report_to` (empty when fine): unknown tracker names, "none"/"all" mixed with names,
    and trackers whose package is not installed, each with its fix."""
    listed = _names(value)
    names = [n for n in listed if n != "none"]
    problems: list[str] = []
    if len(listed) > 1 and ("none" in listed or "all" in listed):
        problems.append(f"train.report_to: {value!r}: 'none' and 'all' stand alone; give one of them or a list of "
                        "tracker names")
        return problems
    if names in ([], ["all"]):   # nothing to look up: transformers' trackers table imports its Trainer (seconds)
        return problems
    known = known_trackers()
    for name in dict.fromkeys(names):
        if name not in known:
            problems.append(f"train.report_to: unknown tracker {name!r}; use none, all or any of "
                            f"{', '.join(known)}")
        elif not _available(name):
            if name in _ENV_HINTS:
                problems.append(f"train.report_to: {name} {_ENV_HINTS[name]}; remove it from train.report_to")
            else:
                problems.append(f"train.report_to: {name} needs `pip install {_PACKAGES.get(name, name)}`")
    return problems


def tracker_arguments(value: list[str] | str | None, logs_dir) -> list[str]:
    """`TrainingArguments.report_to` for `train.report_to`; with a tracker on, TensorBoard logs go to `logs_dir`
    (RUN_DIR/logs). transformers 5 has no `TrainingArguments.logging_dir`: its TensorBoard callback reads the
    TENSORBOARD_LOGGING_DIR environment variable when the Trainer is built, so it is set here, per run."""
    import os

    trackers = report_to_list(value)
    if trackers:
        os.environ["TENSORBOARD_LOGGING_DIR"] = os.fspath(logs_dir)
    return trackers
