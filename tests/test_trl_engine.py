"""`train.engine: trl` runs the same config through trl.DPOTrainer: same run folder, same metric names, and the same
step-0 loss and rewards as the native engine on configs/tiny.yaml (issue 4 must-show 4)."""

import json

import pytest

from conftest import CONFIGS
from dpokit.core.io import read_jsonl


def _first_row(cli, tmp_path, engine):
    out = tmp_path / engine
    res = cli("train", CONFIGS / "tiny.yaml", "--set", f"train.engine={engine}", "--set", "train.max_steps=2",
              "--set", "train.logging_steps=1", "--set", "train.save_steps=1", "--set", f"output.dir={out}", "--no-eval")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "config.yaml").is_file() and (out / "model").is_dir() and (out / "train_summary.json").is_file()
    assert json.loads((out / "train_summary.json").read_text())["engine"] == engine
    # Both engines checkpoint through the staging folder: complete checkpoints, no staging left behind.
    assert not (out / "checkpoints" / ".staging").exists()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["checkpoint-1", "checkpoint-2"], ckpts
    assert all((out / "checkpoints" / c / "trainer_state.json").is_file() for c in ckpts)
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r][0]


@pytest.mark.slow
def test_trl_and_native_agree_at_step_0(cli, tmp_path):
    native, trl = _first_row(cli, tmp_path, "native"), _first_row(cli, tmp_path, "trl")
    assert native["step"] == trl["step"] == 1
    assert native["loss"] == pytest.approx(0.693147, abs=1e-5)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "learning_rate"):
        assert key in trl, key
        assert native[key] == pytest.approx(trl[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_trl_engine_checkpoints_go_through_staging(tmp_path, monkeypatch):
    """Each TRL checkpoint is written under checkpoints/.staging and renamed into place, as native ones are."""
    import os

    from dpokit.core.config import load_config
    from dpokit.train.trainer import run_training

    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((str(a), str(b))) or real_replace(a, b))
    out = tmp_path / "trl"
    run_training(load_config(CONFIGS / "tiny.yaml", ["train.engine=trl", "train.max_steps=2", "train.save_steps=1",
                                                     f"output.dir={out}"]))
    staged = [(a, b) for a, b in renames if ".staging" in a and not b.startswith(a.rsplit("/.staging/", 1)[0] + "/.staging/")]
    assert staged == [(str(out / "checkpoints" / ".staging" / f"checkpoint-{n}"), str(out / "checkpoints" / f"checkpoint-{n}"))
                      for n in (1, 2)]


def test_trl_engine_rejects_what_trl_lacks(cli, tmp_path):
    res = cli("train", CONFIGS / "tiny.yaml", "--set", "train.engine=trl", "--set", "train.loss=simpo",
              "--set", f"output.dir={tmp_path / 'x'}")
    assert res.returncode == 2 and "trl does not implement loss simpo" in res.stderr
    assert not (tmp_path / "x").exists()
