"""Runs follow train.seed and nothing else (issue 21): LoRA's random start, dropout and data order are seeded from the
config, so identical runs are identical whatever ran before them in the process; a resumed run restores the RNG
and the data position; a LoRA reference really is the base model (adapter off); tied rewards are not accurate.

Each test is a few optimizer steps on the tiny models. Every one of them fails on a deliberate bug (see
benchmarks/mutation_check.py, which applies those bugs one at a time and runs these tests)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import StopAt, tiny_config
from dpokit.core.config import TrainConfig, config_from_dict
from dpokit.core.io import read_jsonl
from dpokit.train.losses import PairLogps
from dpokit.train.trainer import DPOTrainer, run_training

TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}
LORA = {"r": 4, "alpha": 8}




def _cfg(tmp_path, name, model="dpokit-tiny-llama", **train):
    return config_from_dict(tiny_config(
        tmp_path, model={"name_or_path": model}, output={"dir": str(tmp_path / name), "save_model": False},
        eval={"enabled": False}, train={"max_steps": 4, "batch_size": 4, **train}))


def _rows(run) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_jsonl(run / "metrics.jsonl")]


def _steps(run) -> dict[int, dict]:
    return {row["step"]: row for row in _rows(run) if "loss" in row}


def _assert_same_steps(a: dict, b: dict, steps, keys, tol=1e-6):
    for step in steps:
        for key in keys:
            assert abs(a[step][key] - b[step][key]) <= tol * max(1.0, abs(a[step][key])), \
                (step, key, a[step][key], b[step][key])


@pytest.mark.slow
def test_two_identical_lora_runs_in_one_process_are_identical(tmp_path, monkeypatch):
    """Must-show 1. The first run builds the tiny model in a fresh cache, the second finds it built, and the
    process RNG is disturbed in between (as earlier tests would): metrics.jsonl must still be identical."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1234)
    first = run_training(_cfg(tmp_path, "first", lora={**LORA, "dropout": 0.1}, learning_rate=1e-2,
                              disable_dropout=False)).run_dir
    torch.rand(1000)
    second = run_training(_cfg(tmp_path, "second", lora={**LORA, "dropout": 0.1}, learning_rate=1e-2,
                               disable_dropout=False)).run_dir
    a, b = _rows(first), _rows(second)
    assert len([r for r in a if "loss" in r]) == 4
    assert a == b


def test_lora_reference_is_the_base_model(tmp_path):
    """The adapter reference (base model, adapter off) equals precomputed base-model log-probs step by step, and with
    a high learning rate the policy really leaves it: margins nonzero and the loss away from ln 2 after step 1."""
    adapter = _steps(run_training(_cfg(tmp_path, "adapter", lora=LORA, learning_rate=3e-2)).run_dir)
    precomputed = _steps(run_training(_cfg(tmp_path, "precomputed", lora=LORA, learning_rate=3e-2,
                                           reference="precomputed")).run_dir)
    assert sorted(adapter) == sorted(precomputed) == [1, 2, 3, 4]
    # Step 1: policy == reference, so every reward is 0: loss ln 2, no margin, and ties are not accurate.
    assert adapter[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert adapter[1]["rewards/margins"] == 0 and adapter[1]["rewards/accuracies"] == 0
    for step in (2, 3, 4):
        assert abs(adapter[step]["rewards/margins"]) > 1e-3, adapter[step]
        assert abs(adapter[step]["loss"] - math.log(2)) > 1e-3, adapter[step]
    _assert_same_steps(adapter, precomputed, [1, 2, 3, 4],
                       ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                        "logps/chosen", "grad_norm"), tol=1e-4)


def _store(lp: PairLogps, beta=0.5):
    """The trainer's metric code on its own (no Trainer): DPOTrainer._store_metrics on a stand-in."""
    fake = SimpleNamespace(accelerator=SimpleNamespace(gather_for_metrics=lambda t: t),
                           dpo_cfg=TrainConfig(beta=beta), _stored={"train": defaultdict(list)})
    DPOTrainer._store_metrics(fake, lp, "train")
    return {k: v[0] for k, v in fake._stored["train"].items()}


def test_tied_rewards_are_not_accurate():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # Pair 0: tie (both log-ratios 0), pair 1: chosen wins, pair 2: tie (equal nonzero log-ratios), pair 3: loses.
    lp = PairLogps(chosen=t(-5.0, -4.0, -6.0, -9.0), rejected=t(-7.0, -8.0, -9.0, -3.0),
                   ref_chosen=t(-5.0, -5.0, -7.0, -8.0), ref_rejected=t(-7.0, -8.0, -10.0, -4.0))
    m = _store(lp)
    assert m["rewards/accuracies"] == pytest.approx(1 / 4)
    assert _store(PairLogps(t(-5.0, -3.0), t(-7.0, -2.0), t(-5.0, -3.0), t(-7.0, -2.0)))["rewards/accuracies"] == 0
    # Reference-free losses (SimPO's implicit reward): equal per-token means tie too.
    free = PairLogps(t(-6.0, -2.0), t(-3.0, -4.0), chosen_tokens=t(4.0, 2.0), rejected_tokens=t(2.0, 2.0))
    assert _store(free)["rewards/accuracies"] == pytest.approx(1 / 2)


@pytest.mark.slow
def test_resume_with_dropout_equals_straight_run(tmp_path, tiny_gpt2):
    """GPT-2 keeps dropout on here (train.disable_dropout: false), so the steps after the resume draw random masks:
    they match the straight run only if the checkpoint's RNG state is restored."""
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in tiny_gpt2[0].modules())
    kw = dict(model="dpokit-tiny-gpt2", disable_dropout=False, save_steps=2, learning_rate=1e-3)
    straight = _steps(run_training(_cfg(tmp_path, "straight", **kw)).run_dir)
    run_training(_cfg(tmp_path, "split", **kw), callbacks=[StopAt(2)])
    assert (tmp_path / "split" / "checkpoints" / "checkpoint-2" / "rng_state.pth").is_file()
    torch.rand(1000)  # the resume must not depend on the RNG state this process happens to be in
    resumed = _steps(run_training(_cfg(tmp_path, "split", **kw), resume=True).run_dir)
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4]
    _assert_same_steps(straight, resumed, [3, 4], ("loss", "logps/chosen", "logps/rejected", "grad_norm"))


@pytest.mark.parametrize("budget", [None, 120], ids=["batch_size", "token_budget"])
def test_resume_continues_at_the_data_position(tmp_path, budget):
    """A learning rate too small to move the weights makes each step's log-probs a function of its batch alone: the
    resumed steps 3-4 see the straight run's batches 3-4, not batches 1-2 again (default and token-budget
    samplers)."""
    kw = dict(save_steps=2, learning_rate=1e-12, max_tokens_per_batch=budget)
    straight = _steps(run_training(_cfg(tmp_path, "straight", **kw)).run_dir)
    run_training(_cfg(tmp_path, "split", **kw), callbacks=[StopAt(2)])
    resumed = _steps(run_training(_cfg(tmp_path, "split", **kw), resume=True).run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    _assert_same_steps(straight, resumed, [1, 2, 3, 4], ("logps/chosen", "logps/rejected"))
    batches = {round(straight[s]["logps/chosen"], 4) for s in (1, 2, 3, 4)}
    assert len(batches) == 4  # four different batches, so a restart from batch 1 would show
    # The weights stay put, so the loss is ln 2 per pair at every step, whatever the batch holds (token-budget
    # batches hold varying pair counts: the loss is normalised per pair, not per batch).
    assert all(abs(straight[s]["loss"] - math.log(2)) < 1e-4 for s in straight), straight
