"""Parity with trl.DPOTrainer (trl 1.16): the same tiny model, the same batch, every loss both implement.
Loss, rewards/* and the gradient of every parameter agree to rtol 1e-5 in fp32 (issue 2 must-show 2, issue 4 #1).

TRL is fed in its own format: DataCollatorForPreference builds input_ids/attention_mask/completion_mask from the
same token ids, and its _compute_loss runs the model with its fused LM head (log-probs without logits)."""

import copy

import pytest
import torch

from dpokit.core.batching import PairCollator
from dpokit.core.config import TrainConfig
from dpokit.data.encode import encode_pair
from dpokit.train.losses import needs_reference, trl_loss_names

ROWS = [
    {"prompt": "How is the weather today?", "chosen": "Warm and sunny, enjoy it!", "rejected": "Cold."},
    {"prompt": "Any advice for my exam?", "chosen": "You prepared well; breathe and trust yourself.", "rejected": "No."},
    {"prompt": "Tell me about tea.", "chosen": "Tea is a cozy drink shared with friends.", "rejected": "It is a leaf."},
    {"prompt": "What should I cook?", "chosen": "A warm soup would be lovely tonight.", "rejected": "Whatever, I guess."},
]

CASES = [  # (dpokit loss spec, label_smoothing)
    ("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2), ("sft", 0.0), ("sigmoid:1.0,sft:0.5", 0.0),
]


def _perturbed(model, seed=1, scale=0.02):
    """A policy that differs from the reference, so log-ratios (and every loss term) are non-trivial."""
    policy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return policy


def _pairs(tokenizer):
    return [encode_pair(r, tokenizer, max_length=64) for r in ROWS]


def _grads(model):
    return {n.removeprefix("base_model.model."): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def dpokit_side(base, policy, tokenizer, pairs, loss, eps, tmp_path):
    from transformers import TrainingArguments

    from dpokit.train.trainer import DPOTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "ours"), report_to=[], remove_unused_columns=False,
                             per_device_train_batch_size=len(pairs))
    cfg = TrainConfig(loss=loss, beta=0.1, label_smoothing=eps)
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=pairs, data_collator=PairCollator(tokenizer.pad_token_id),
                         processing_class=tokenizer, dpo_cfg=cfg, ref_model=ref)
    policy.train()
    batch = PairCollator(tokenizer.pad_token_id)([dict(p) for p in pairs])
    loss_value = trainer.compute_loss(policy, batch)
    loss_value.backward()
    metrics = {k: v[0] for k, v in trainer._stored["train"].items()}
    return loss_value.item(), metrics, _grads(policy)


def trl_side(base, policy, tokenizer, pairs, loss_types, weights, eps, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.1, loss_type=loss_types,
                     loss_weights=weights, label_smoothing=eps, max_length=None,
                     per_device_train_batch_size=len(pairs), bf16=False)
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    trainer = TRLDPOTrainer(model=policy, ref_model=ref, args=args,
                            train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs])
    trainer.model.train()
    loss_value = trainer.compute_loss(trainer.model, batch)
    loss_value.backward()
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}
    return loss_value.item(), metrics, _grads(trainer.model)


@pytest.mark.parametrize("loss,eps", CASES)
def test_matches_trl(loss, eps, tiny_llama, tmp_path):
    from dpokit.train.losses import parse_loss_spec

    base, tokenizer = tiny_llama
    pairs = _pairs(tokenizer)
    terms = parse_loss_spec(loss)
    torch.manual_seed(0)
    ours_loss, ours_m, ours_g = dpokit_side(base, _perturbed(base), tokenizer, pairs, loss, eps, tmp_path)
    trl_loss, trl_m, trl_g = trl_side(base, _perturbed(base), tokenizer, pairs, [trl_loss_names()[n] for n, _ in terms],
                                      [w for _, w in terms], eps, tmp_path)
    assert ours_loss == pytest.approx(trl_loss, rel=1e-5)
    keys = ["logps/chosen", "logps/rejected"]
    if needs_reference(terms):  # reference-free dpokit losses report SimPO-style rewards; TRL always uses its ref
        keys += ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
    for key in keys:
        assert ours_m[key] == pytest.approx(trl_m[key], rel=1e-5, abs=1e-7), key
    assert set(ours_g) == set(trl_g)
    for name, grad in ours_g.items():
        # Relative error of each parameter's gradient tensor (elementwise, a near-zero entry of a 65k-entry
        # embedding gradient can differ by float noise in relative terms: TRL's fused LM head sums in another order).
        rel = ((grad - trl_g[name]).norm() / trl_g[name].norm().clamp(min=1e-12)).item()
        assert rel < 1e-5, (name, rel)
