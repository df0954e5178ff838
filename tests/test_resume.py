"""`--resume` continues exactly: 10 steps straight == 5 steps, stop, resume for the last 5 (issue 4 must-show 3).
Model, optimizer, scheduler, RNG and data order all come from the checkpoint."""

import pytest
import torch

from conftest import StopAt, tiny_config
from dpokit.core.config import config_from_dict
from dpokit.core.io import read_jsonl


def _cfg(tmp_path, name):
    # cosine schedule + warmup + accumulation: a resume that lost scheduler or data position would diverge.
    return config_from_dict(tiny_config(
        tmp_path, output={"dir": str(tmp_path / name)}, eval={"enabled": False},
        train={"max_steps": 10, "save_steps": 5, "batch_size": 4, "lr_scheduler": "cosine", "warmup_steps": 2,
               "grad_accum": 2, "learning_rate": 1e-3, "seed": 7, "save_total_limit": 3}))


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def _last_loss(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r][-1]


@pytest.mark.slow
def test_resume_matches_straight_run(tmp_path, cli):
    from dpokit.train.trainer import run_training

    straight = run_training(_cfg(tmp_path, "straight")).run_dir
    split_cfg = _cfg(tmp_path, "split")
    run_training(split_cfg, callbacks=[StopAt(5)])
    assert (tmp_path / "split" / "checkpoints" / "checkpoint-5").is_dir()
    # The resume goes through the CLI, as a user runs it.
    cfg_file = tmp_path / "split.yaml"
    cfg_file.write_text(split_cfg.to_yaml())
    res = cli("train", cfg_file, "--resume", "--no-eval")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from " in res.stdout and "checkpoint-5 (step 5 of 10)" in res.stdout, res.stdout

    a, b = _last_loss(straight), _last_loss(tmp_path / "split")
    assert a["step"] == b["step"] == 10
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6, rel=0)
    assert b["learning_rate"] == pytest.approx(a["learning_rate"], abs=1e-12)
    # train_summary.json: metrics over the whole run, not only the resumed half (Trainer's own train_loss).
    import json

    sa, sb = (json.loads((d / "train_summary.json").read_text()) for d in (straight, tmp_path / "split"))
    assert sb["metrics"]["train_loss"] == pytest.approx(sa["metrics"]["train_loss"], abs=1e-6, rel=0)
    assert sa["global_step"] == sb["global_step"] == 10
    wa, wb = _weights(straight), _weights(tmp_path / "split")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6, rtol=0), name


def test_resume_without_checkpoint_is_a_user_error(tmp_path, cli):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    res = cli("train", cfg, "--resume")
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr
