"""Training options passed to transformers' Trainer do what their help says: gradient checkpointing changes memory,
not numbers; eval_steps / save_steps evaluate and checkpoint on schedule; precision is checked on this hardware."""

import json

import pytest

from conftest import tiny_config
from dpokit.core.config import config_from_dict
from dpokit.core.errors import UserError
from dpokit.core.io import read_jsonl
from dpokit.train.trainer import run_training


def _train(tmp_path, name, **train):
    cfg = config_from_dict(tiny_config(tmp_path, output={"dir": str(tmp_path / name)}, eval={"enabled": False},
                                       train={"max_steps": 4, "batch_size": 4, **train}))
    run_training(cfg)
    return tmp_path / name


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_run(tmp_path, lora):
    plain = _train(tmp_path, "plain", lora=lora)
    ckpt = _train(tmp_path, "ckpt", lora=lora, gradient_checkpointing=True)
    assert json.loads((ckpt / "training_args.json").read_text())["gradient_checkpointing"] is True
    a = [r for r in read_jsonl(plain / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_jsonl(ckpt / "metrics.jsonl") if "loss" in r]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), (ra["step"], key, ra[key], rb[key])


def test_eval_and_save_every_n_steps(tmp_path):
    run = _train(tmp_path, "run", eval_steps=2, save_steps=2, save_total_limit=5)
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if any(k.startswith("eval_") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    assert all("eval_rewards/accuracies" in r for r in evals)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_fp16_is_refused_on_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    cfg = config_from_dict(tiny_config(tmp_path, train={"precision": "fp16", "max_steps": 1}))
    with pytest.raises(UserError, match="train.precision"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder is written
