"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE is set before transformers is imported, and the
dpokit cache (tiny models, converted SmolLM2) lives in a per-session folder unless DPOKIT_TEST_CACHE is set."""

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# Subprocesses (the CLI) must import this tree's dpokit, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
# A shared cache across tests and sessions keeps the SmolLM2 conversion to once per machine.
os.environ.setdefault("DPOKIT_CACHE", os.environ.get("DPOKIT_TEST_CACHE", str(Path.home() / ".cache" / "dpokit-tests")))

FIXTURES = ROOT / "tests" / "fixtures"
CONFIGS = ROOT / "configs"


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m dpokit ARGS` as a real subprocess; returns CompletedProcess with text output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "dpokit", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_llama():
    from dpokit.models import load_model, load_tokenizer

    return load_model("dpokit-tiny-llama", dtype="float32"), load_tokenizer("dpokit-tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from dpokit.models import load_model, load_tokenizer

    return load_model("dpokit-tiny-gpt2", dtype="float32"), load_tokenizer("dpokit-tiny-gpt2")


def tiny_config(tmp_path, **sections):
    """A RunConfig dict on the tiny model and data, with section overrides."""
    cfg = {
        "model": {"name_or_path": "dpokit-tiny-llama"},
        "data": {"source": str(CONFIGS / "data" / "tiny_prefs.jsonl"), "eval_fraction": 0.2, "max_length": 64},
        "train": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 8, "logging_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg
