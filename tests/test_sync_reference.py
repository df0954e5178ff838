"""TR-DPO reference syncing (train.sync_reference, issue 27): after every `steps`-th optimizer step the reference is
alpha * policy + (1 - alpha) * the reference before, as TRL's SyncRefModelCallback does."""

import copy

import pytest
import torch
from transformers import TrainerCallback

from conftest import tiny_config
from dpokit.core.config import RunConfig, TrainConfig
from dpokit.train.plan import plan_training
from dpokit.train.trainer import SyncReferenceCallback, build_trainer, setup, write_run_start
from dpokit.train.trl_engine import trl_loss_options


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_callback_mixes_the_policy_into_the_reference_every_n_steps(tiny_llama):
    """ref_new = alpha * policy + (1 - alpha) * ref_old at steps N, 2N; untouched in between."""
    base, _ = tiny_llama
    policy, reference = copy.deepcopy(base), copy.deepcopy(base)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    callback = SyncReferenceCallback(policy, reference, alpha=0.25, steps=3)

    class State:
        global_step = 0

    state = State()
    old = _params(reference)
    for step in (1, 2):
        state.global_step = step
        callback.on_step_end(None, state, None)
        assert all(torch.equal(p, old[n]) for n, p in reference.named_parameters()), step
    state.global_step = 3
    callback.on_step_end(None, state, None)
    pol = _params(policy)
    for name, p in reference.named_parameters():
        want = 0.25 * pol[name] + 0.75 * old[name]
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, old[name]) or torch.equal(pol[name], old[name])


def test_a_training_run_syncs_its_reference_after_n_steps(tmp_path):
    """A real run (tiny LLaMA, reference: model, sync every 2 steps, alpha 0.5): after step 1 the reference is the
    initial one; after step 2 it is 0.5 * the policy after step 2 + 0.5 * the initial reference."""
    raw = tiny_config(tmp_path, train={"reference": "model", "max_steps": 2, "batch_size": 2, "learning_rate": 1e-2,
                                       "sync_reference": {"alpha": 0.5, "steps": 2}, "save_steps": 0},
                      eval={"enabled": False})
    plan = plan_training(RunConfig(**raw), evaluate=False)
    s = setup(plan)
    initial = _params(s.ref_model)
    seen = {}

    class Record(TrainerCallback):  # runs after the sync callback (user callbacks are added last)
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = (_params(model), _params(s.ref_model))

    write_run_start(plan, s)
    trainer = build_trainer(plan, s, [Record()])
    trainer.train()
    policy_1, ref_1 = seen[1]
    assert all(torch.equal(ref_1[n], initial[n]) for n in initial)
    assert any(not torch.equal(policy_1[n], initial[n]) for n in initial)  # the policy did move
    policy_2, ref_2 = seen[2]
    for name in initial:
        torch.testing.assert_close(ref_2[name], 0.5 * policy_2[name] + 0.5 * initial[name], rtol=1e-6, atol=1e-7)


def test_engine_trl_gets_trls_sync_options():
    cfg = TrainConfig(sync_reference={"alpha": 0.3, "steps": 7})
    opts = trl_loss_options(cfg)
    assert (opts["sync_ref_model"], opts["ref_model_mixup_alpha"], opts["ref_model_sync_steps"]) == (True, 0.3, 7)
    assert "sync_ref_model" not in trl_loss_options(TrainConfig())


@pytest.mark.slow
def test_a_run_killed_after_a_sync_resumes_to_the_straight_runs_losses(tmp_path):
    """Sync every 2 steps, checkpoint every 3: the run stops after step 3 (one sync, at step 2, behind it); the
    checkpoint holds the synced reference, and the resumed steps 4-6 (a sync at step 4) equal the straight run's."""
    from conftest import StopAt
    from dpokit.core.config import config_from_dict
    from dpokit.core.io import read_jsonl
    from dpokit.train.resilience import SYNCED_REFERENCE_FILE
    from dpokit.train.trainer import run_training

    def cfg(name):
        return config_from_dict(tiny_config(
            tmp_path, output={"dir": str(tmp_path / name), "save_model": False}, eval={"enabled": False},
            train={"max_steps": 6, "batch_size": 4, "save_steps": 3, "reference": "model", "learning_rate": 1e-2,
                   "sync_reference": {"alpha": 0.5, "steps": 2}}))

    def steps(name):
        return {r["step"]: r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r}

    run_training(cfg("straight"))
    run_training(cfg("split"), callbacks=[StopAt(3)])
    assert (tmp_path / "split" / "checkpoints" / "checkpoint-3" / SYNCED_REFERENCE_FILE).is_file()
    run_training(cfg("split"), resume=True)
    straight, resumed = steps("straight"), steps("split")
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert abs(straight[step][key] - resumed[step][key]) <= 1e-6 * max(1.0, abs(straight[step][key])), \
                (step, key, straight[step][key], resumed[step][key])
    # the checkpoint's reference is the synced one (step 2), not the initial model a plain resume would rebuild
    from dpokit.core.models import load_model

    saved = torch.load(tmp_path / "split" / "checkpoints" / "checkpoint-3" / SYNCED_REFERENCE_FILE, weights_only=True)
    initial = dict(load_model("dpokit-tiny-llama", dtype="float32").named_parameters())
    assert any(not torch.equal(saved[n], initial[n].detach()) for n in saved)
