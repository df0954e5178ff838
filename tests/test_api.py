"""The Python API: names resolve lazily, none shadows a subpackage, and the 0.1 `dpokit.train(cfg)` still works."""

import importlib
import warnings

import pytest

import dpokit
from conftest import tiny_config
from dpokit.core.config import config_from_dict


def test_public_names_and_subpackages_coexist():
    packing = importlib.import_module("dpokit.train.packing")
    assert dpokit.train.packing is packing
    assert callable(dpokit.run_training) and callable(dpokit.plan_training) and callable(dpokit.evaluate)
    assert dpokit.RunDir.__module__ == "dpokit.core.run"
    with pytest.raises(AttributeError):
        dpokit.no_such_name  # noqa: B018


def test_deprecated_train_call_trains_and_warns(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, train={"max_steps": 2}, eval={"enabled": False}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = dpokit.train(cfg)
    assert any(issubclass(w.category, DeprecationWarning) and "run_training" in str(w.message) for w in caught)
    assert dpokit.RunDir(result.run_dir).read_train_summary().global_step == 2
