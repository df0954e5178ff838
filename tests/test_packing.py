"""Packed (prefix-shared, padding-free) batches give the padded path's log-probs, losses and gradients."""

import copy
import json
import logging
import random
import shutil

import pytest
import torch

from conftest import CONFIGS
from dpokit.core.batching import PairCollator, sequence_logps
from dpokit.core.config import TrainConfig
from dpokit.core.packing import PackedPairCollator, pack_pairs, packed_sequence_logps, packing_self_check
from dpokit.train.losses import PairLogps, sigmoid_loss
from dpokit.train.packing import TokenBudgetBatchSampler, choose_collator
from dpokit.train.trainer import disable_dropout

TOL = 1e-5


def make_pairs(shapes, vocab, seed=0):
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in shapes]


# Empty and one-token prompts, one-token responses, unequal lengths (several pairs share a row).
MIXED = [(0, 4, 6), (1, 3, 2), (1, 1, 1), (9, 5, 3), (14, 7, 9), (2, 6, 1), (5, 2, 8)]
SHAPES = {"mixed": MIXED, "one pair": [(6, 4, 5)], "one pair, empty prompt": [(0, 5, 3)],
          "one pair, one-token prompt": [(1, 2, 4)]}


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model_and_pad(request):
    model, tokenizer = request.getfixturevalue(request.param)
    return model, tokenizer.pad_token_id


def dpo_loss(model, ref, batch, logps_fn):
    policy = logps_fn(model, batch)
    with torch.no_grad():
        reference = logps_fn(ref, batch)
    lp = PairLogps(policy["chosen"], policy["rejected"], reference["chosen"], reference["rejected"])
    return sigmoid_loss(lp, TrainConfig(beta=0.5)).mean(), policy


@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
def test_packed_matches_padded_logps_loss_and_grads(model_and_pad, shapes):
    model, pad_id = model_and_pad
    policy = copy.deepcopy(model).train()
    disable_dropout(policy)  # as the trainer does (train.disable_dropout); GPT-2 has dropout 0.1
    ref = copy.deepcopy(model).eval()
    # Move the policy away from the reference so the loss has a non-trivial gradient (own generator: the same
    # policy whatever ran before, in any test order).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    pairs = make_pairs(SHAPES[shapes], model.config.vocab_size)

    results = {}
    for name, collate, fn in (("padded", PairCollator(pad_id), sequence_logps),
                              ("packed", PackedPairCollator(pad_id), packed_sequence_logps)):
        policy.zero_grad()
        loss, logps = dpo_loss(policy, ref, collate(pairs), fn)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
        results[name] = (loss.detach(), {k: v.detach() for k, v in logps.items()}, grads)

    (loss_a, lp_a, g_a), (loss_b, lp_b, g_b) = results["padded"], results["packed"]
    # Summed fp32 log-probs reach |100+|, where one rounding step is 1.5e-5: tolerance relative as well.
    for key in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        assert torch.allclose(lp_a[key], lp_b[key], atol=TOL, rtol=1e-6), (key, lp_a[key], lp_b[key])
    assert abs(float(loss_a) - float(loss_b)) < TOL
    assert g_a.keys() == g_b.keys() and g_a
    worst = max((g_a[n] - g_b[n]).abs().max().item() for n in g_a)
    assert worst < TOL, worst


def test_packed_matches_padded_under_eager_attention():
    """Eager attention takes the packed mask as an additive float mask (sdpa, the default, takes the bool mask)."""
    from dpokit.core.models import load_model, load_tokenizer

    model = load_model("dpokit-tiny-llama", dtype="float32", attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    pairs = make_pairs(MIXED, model.config.vocab_size)
    pad_id = load_tokenizer("dpokit-tiny-llama").pad_token_id
    with torch.no_grad():
        padded = sequence_logps(model, PairCollator(pad_id)(pairs))
        packed = packed_sequence_logps(model, PackedPairCollator(pad_id)(pairs))
    for key in ("chosen", "rejected"):
        assert torch.allclose(padded[key], packed[key], atol=TOL, rtol=1e-6), (key, padded[key], packed[key])


def test_prefix_sharing_layout():
    """[prompt, chosen, rejected]: rejected restarts at the prompt length and never sees chosen."""
    pair = {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10, 11]}
    short = {"prompt_ids": [12], "chosen_ids": [13], "rejected_ids": [14]}
    batch = pack_pairs([pair, short], pad_id=0)
    assert batch["input_ids"].shape == (2, 7)  # the short pair does not fit beside the long one (7 + 3 > 7)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    mask = batch["attention_mask"][0, 0]
    assert mask[5, :2].all() and not mask[5, 2:5].any() and mask[5, 5] and not mask[5, 6]
    # first rejected token (10) is predicted from the last prompt token (position 1)
    first_rej = (batch["score_slot"] == 2) & (batch["score_target"] == 10)
    assert batch["score_pos"][first_rej].tolist() == [1]
    # two short pairs share a row: block-diagonal
    batch = pack_pairs([pair, short, short], pad_id=0)
    assert batch["input_ids"].shape == (2, 7) and batch["input_ids"][1, :6].tolist() == [12, 13, 14] * 2
    assert not batch["attention_mask"][1, 0, 3:6, 0:3].any()


def test_ref_logps_pass_through():
    pairs = [{"prompt_ids": [3], "chosen_ids": [4], "rejected_ids": [5], "ref_chosen_logps": -1.5,
              "ref_rejected_logps": -2.5}]
    batch = pack_pairs(pairs, 0)
    assert batch["ref_chosen_logps"].tolist() == [-1.5] and batch["ref_rejected_logps"].tolist() == [-2.5]


def test_self_check_passes_on_supported_models(tiny_llama, tiny_gpt2):
    for model, tok in (tiny_llama, tiny_gpt2):
        pair = make_pairs([(5, 4, 6)], model.config.vocab_size)[0]
        assert packing_self_check(model, pair, tok.pad_token_id) is None


def test_pair_logps_packed_equals_padded(model_and_pad, monkeypatch):
    """Evaluation and the reference precompute score pairs packed when the self-check passes: same sums, same
    token counts as padded rows (batches of 3 over the mixed shapes, so rows hold several pairs)."""
    from dpokit.core import packing, scoring
    from dpokit.core.scoring import pair_logps

    model, pad_id = model_and_pad
    pairs = make_pairs(MIXED, model.config.vocab_size, seed=3)
    packed_batches = []
    real_pack = packing.pack_pairs
    counting = lambda batch, pad: packed_batches.append(len(batch)) or real_pack(batch, pad)  # noqa: E731
    monkeypatch.setattr(packing, "pack_pairs", counting)  # the self-check's
    monkeypatch.setattr(scoring, "pack_pairs", counting)  # pair_logps' batches
    packed = pair_logps(model, pairs, pad_id, batch_size=3)  # packing on, and the self-check passes here
    assert packed_batches == [1, 3, 3, 1]  # the one-pair self-check, then every batch packed
    padded = pair_logps(model, pairs, pad_id, batch_size=3, packing=False)
    assert packed_batches == [1, 3, 3, 1]  # ... and nothing packed with packing off
    for key in ("chosen", "rejected"):
        assert torch.allclose(torch.tensor(packed[key]), torch.tensor(padded[key]), rtol=TOL, atol=TOL)
        assert packed[f"{key}_tokens"] == padded[f"{key}_tokens"]


def test_self_check_falls_back_on_a_model_that_rejects_4d_masks(caplog):
    from transformers import AutoModelForCausalLM, BloomConfig

    torch.manual_seed(0)
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=200, hidden_size=32, n_layer=1, n_head=4))
    pairs = make_pairs([(4, 3, 2)], 200)
    with caplog.at_level(logging.WARNING):
        collator, sampler = choose_collator(TrainConfig(), bloom, None, pairs, 0)
    assert isinstance(collator, PairCollator) and sampler is None
    warnings = [r.getMessage() for r in caplog.records if "falling back to padded" in r.getMessage()]
    assert len(warnings) == 1 and "BloomForCausalLM" in warnings[0] and "\n" not in warnings[0]


def test_token_budget_sampler_covers_every_pair_once_and_is_reproducible():
    lengths = [random.Random(i).randrange(5, 300) for i in range(200)]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=1000, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 1000 for b in batches)
    assert len(batches) == len(sampler)
    assert list(TokenBudgetBatchSampler(lengths, max_tokens=1000, seed=3)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches and sorted(map(tuple, sampler)) == sorted(map(tuple, batches))
    # length-grouped: within a batch, lengths are close
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 60


def read_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_tiny_config_loss_curve_packed_matches_padded(cli, tmp_path):
    curves = {}
    for packing in ("dense", "padded"):
        out = tmp_path / f"layout-{packing}"
        res = cli("train", CONFIGS / "tiny.yaml", "--set", f"output.dir={out}", "--set", f"train.layout={packing}",
                  "--no-eval")
        assert res.returncode == 0, res.stderr[-2000:]
        assert "falling back" not in res.stderr
        curves[packing] = read_losses(out)
    assert len(curves["dense"]) == len(curves["padded"]) > 5
    for (step_a, a), (step_b, b) in zip(curves["dense"], curves["padded"]):
        assert step_a == step_b and abs(a - b) < 1e-4, (step_a, a, b)


@pytest.mark.slow
def test_token_budget_training_resumes_with_the_same_data_order(cli, tmp_path):
    args = ["--set", "train.max_tokens_per_batch=300", "--set", "train.max_steps=4", "--set", "train.save_steps=2",
            "--set", "train.grad_accum=2", "--set", "train.logging_steps=1", "--no-eval"]
    full = tmp_path / "full"
    res = cli("train", CONFIGS / "tiny.yaml", "--set", f"output.dir={full}", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    # Interrupted copy: drop the last checkpoint and the rows after step 2, then resume.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-4")
    rows = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= 2))
    res = cli("train", part / "config.yaml", "--set", f"output.dir={part}", "--resume", "--no-eval")
    assert res.returncode == 0, res.stderr[-2000:]
    want = dict(read_losses(full))
    got = dict(read_losses(part))
    for step in (3, 4):
        assert abs(want[step] - got[step]) < 1e-5, (step, want[step], got[step])
