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


@pytest.mark.slow  # two trainings in fresh interpreters (about 25 s)
def test_library_calls_print_nothing_unless_asked(tmp_path):
    """The README's API snippet in a fresh interpreter: no header, no step lines, no tables, no progress bars on
    stdout or stderr; `progress=True` prints the training lines."""
    import subprocess
    import sys

    code = (
        "import sys, dpokit\n"
        "cfg = dpokit.load_config(sys.argv[1], [f'output.dir={sys.argv[2]}', 'train.max_steps=3',\n"
        "                                       'eval.num_prompts=2', 'eval.max_new_tokens=8'])\n"
        "result = dpokit.run_training(dpokit.plan_training(cfg), progress=sys.argv[3] == 'yes')\n"
        "dpokit.evaluate(result.run_dir)\n"
    )
    from conftest import CONFIGS

    quiet = subprocess.run([sys.executable, "-c", code, str(CONFIGS / "tiny.yaml"), str(tmp_path / "a"), "no"],
                           capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout == "" and quiet.stderr == "", (quiet.stdout[-2000:], quiet.stderr[-2000:])
    loud = subprocess.run([sys.executable, "-c", code, str(CONFIGS / "tiny.yaml"), str(tmp_path / "b"), "yes"],
                          capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "dpokit train: dpokit-tiny-llama" in loud.stdout and "step 2/3" in loud.stdout
    assert "step-0 check: sigmoid loss 0.69314" in loud.stdout
