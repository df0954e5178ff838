"""reference: precomputed: a beta sweep's second run does zero reference forwards, and its metrics equal a run that
computes the reference log-probs itself (issue 4 must-show 2)."""

import json

import pytest

from conftest import tiny_config
from dpokit.core.config import config_from_dict
from dpokit.core.io import read_jsonl

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "grad_norm")


def _run(tmp_path, name, monkeypatch, cache, **train):
    from dpokit.train.trainer import run_training

    monkeypatch.setenv("DPOKIT_CACHE", str(cache))
    base = {"max_steps": 4, "reference": "precomputed", "seed": 3}
    cfg = config_from_dict(tiny_config(tmp_path, train={**base, **train}, output={"dir": str(tmp_path / name)},
                                       eval={"enabled": False}))
    run_dir = run_training(cfg).run_dir
    summary = json.loads((run_dir / "train_summary.json").read_text())
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    return summary, rows


def _models_dir(monkeypatch, tmp_path):
    """Keep the tiny model build in the session cache: link it into each test cache."""
    import os

    from dpokit.core.models import cache_dir

    shared = cache_dir() / "models"
    for cache in ("cache_a", "cache_b"):
        (tmp_path / cache).mkdir()
        os.symlink(shared, tmp_path / cache / "models")


@pytest.mark.slow
def test_beta_sweep_reuses_reference_logps(tmp_path, monkeypatch):
    from dpokit.core.models import resolve_model_path

    resolve_model_path("dpokit-tiny-llama")  # build once in the shared cache
    _models_dir(monkeypatch, tmp_path)
    first, _ = _run(tmp_path, "beta01", monkeypatch, tmp_path / "cache_a", beta=0.1)
    assert first["reference_cache"]["cache"] == "miss" and first["reference_forwards"]["precompute"] > 0
    assert first["reference_forwards"]["training"] == 0  # no reference model during training

    second, rows = _run(tmp_path, "beta02", monkeypatch, tmp_path / "cache_a", beta=0.2)
    assert second["reference_cache"]["cache"] == "hit"
    assert second["reference_forwards"] == {"precompute": 0, "training": 0}
    assert second["step0_check"]["policy_equals_reference"]

    # The same run with an empty cache computes the reference itself: identical metrics.
    fresh, fresh_rows = _run(tmp_path, "beta02_fresh", monkeypatch, tmp_path / "cache_b", beta=0.2)
    assert fresh["reference_cache"]["cache"] == "miss"
    assert len(rows) == len(fresh_rows) == 4
    for got, want in zip(rows, fresh_rows, strict=True):
        for key in METRICS:
            assert got[key] == pytest.approx(want[key], abs=1e-6, rel=0), key

    # And a live reference model (forwards every step) agrees up to padding-dependent float noise.
    live, live_rows = _run(tmp_path, "beta02_live", monkeypatch, tmp_path / "cache_b", beta=0.2, reference="model")
    assert live["reference_forwards"]["training"] == 4
    for got, want in zip(rows, live_rows, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_cache_key_changes_with_its_parts():
    from dpokit.train.reference import cache_key

    base = cache_key("m", "d", "tpl", 64)
    assert len({base, cache_key("m2", "d", "tpl", 64), cache_key("m", "d2", "tpl", 64),
                cache_key("m", "d", "other", 64), cache_key("m", "d", "tpl", 128)}) == 5
