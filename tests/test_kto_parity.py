"""KTO parity with trl.KTOTrainer (trl 1.16), issue 16 must-show 1: the same tiny model, the same batch of unpaired
rows with the same mismatched KL completions (TRL shifts completions by one within the batch; dpokit's
`attach_kl_completions` gives the same shift when prompts differ). In fp32: loss, logps/* and every parameter's
gradient agree to rtol 1e-5; rewards/* and kl (differences of log-prob sums) to an absolute 1e-5.

dpokit scores the completion and the KL completion of a row in one prefix-shared segment; TRL runs two padded
forwards (the KL one without gradient). z0 is detached in both, so the gradients must match too."""

import copy

import pytest
import torch

from dpokit.core.config import TrainConfig
from dpokit.core.packing import ListCollator
from dpokit.data.encode import attach_kl_completions, encode_feedback

ROWS = [
    {"prompt": "How is the weather today?", "completion": " Warm and sunny, enjoy it!", "label": True},
    {"prompt": "Any advice for my exam?", "completion": " No.", "label": False},
    {"prompt": "Tell me about tea.", "completion": " Tea is a cozy drink shared with friends.", "label": True},
    {"prompt": "What should I cook?", "completion": " Whatever, I guess.", "label": False},
    {"prompt": "How was the sea?", "completion": " Lovely and bright.", "label": True},
]


def _perturbed(model, seed=1, scale=0.02):
    policy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return policy


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _encoded(tokenizer):
    rows = [encode_feedback(r, tokenizer, max_length=64) for r in ROWS]
    for r in rows:
        r.pop("truncated")
    attach_kl_completions(rows, max_length=64)
    return rows


def dpokit_side(ref, policy, tokenizer, rows, tmp_path):
    from transformers import TrainingArguments

    from dpokit.train.trainer import DPOTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "ours"), report_to=[], remove_unused_columns=False,
                             per_device_train_batch_size=len(rows))
    cfg = TrainConfig(loss="kto", beta=0.1, desirable_weight=1.3, undesirable_weight=0.8)
    ref = copy.deepcopy(ref).eval().requires_grad_(False)
    collator = ListCollator(tokenizer.pad_token_id)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=rows, data_collator=collator,
                         processing_class=tokenizer, dpo_cfg=cfg, ref_model=ref)
    policy.train()
    loss = trainer.compute_loss(policy, collator([dict(r) for r in rows]))
    loss.backward()
    return loss.item(), {k: v[0] for k, v in trainer._stored["train"].items()}, _grads(policy)


def trl_side(ref, policy, tokenizer, rows, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.1, desirable_weight=1.3,
                     undesirable_weight=0.8, max_length=None, per_device_train_batch_size=len(rows), bf16=False)
    ref = copy.deepcopy(ref).eval().requires_grad_(False)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tokenizer)
    batch = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": r["prompt_ids"], "completion_ids": r["responses_ids"][0],
          "KL_completion_ids": r["responses_ids"][1], "label": r["label"]} for r in rows])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.item(), {k: v[0] for k, v in trainer._metrics["train"].items()}, _grads(trainer.model)


def test_kto_matches_trl(tiny_llama, tmp_path):
    base, tokenizer = tiny_llama
    rows = _encoded(tokenizer)
    # the mismatched completion of row i is row i-1's (TRL's shift by one)
    assert [r["responses_ids"][1] for r in rows] == [rows[i - 1]["responses_ids"][0] for i in range(len(rows))]
    # A reference further from the trained weights than the policy: the policy gives the mismatched completions
    # higher log-probs, so the KL estimate z0 is positive and enters the loss (not clamped to 0).
    ref = _perturbed(base, seed=2, scale=0.03)
    torch.manual_seed(0)
    ours_loss, ours_m, ours_g = dpokit_side(ref, _perturbed(base, scale=0.005), tokenizer, rows, tmp_path)
    trl_loss, trl_m, trl_g = trl_side(ref, _perturbed(base, scale=0.005), tokenizer, rows, tmp_path)
    assert ours_loss == pytest.approx(trl_loss, rel=1e-5)
    assert ours_m["kl"] > 0  # the perturbed policy gives a positive KL estimate: z0 is not clamped away
    for key in ("logps/chosen", "logps/rejected"):
        assert ours_m[key] == pytest.approx(trl_m[key], rel=1e-5), key
    # Rewards and kl are differences of log-prob sums near -100 (fp32, one packed vs two padded forwards agree to
    # ~1e-5 there), so they agree in absolute terms: 1e-5 nats of log-ratio, times beta for the rewards.
    for key in ("rewards/chosen", "rewards/rejected", "kl"):
        assert ours_m[key] == pytest.approx(trl_m[key], rel=0, abs=1e-5), key
    assert set(ours_g) == set(trl_g)
    for name, grad in ours_g.items():
        rel = ((grad - trl_g[name]).norm() / trl_g[name].norm().clamp(min=1e-12)).item()
        assert rel < 1e-5, (name, rel)
