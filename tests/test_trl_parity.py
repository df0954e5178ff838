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


def dpokit_side(base, policy, tokenizer, pairs, loss, eps, tmp_path, packed=False, **options):
    """dpokit's trainer on one batch: padded (PairCollator) or packed (PackedPairCollator, the training default)."""
    from transformers import TrainingArguments

    from dpokit.core.packing import PackedPairCollator
    from dpokit.train.trainer import DPOTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "ours"), report_to=[], remove_unused_columns=False,
                             per_device_train_batch_size=len(pairs))
    cfg = TrainConfig(loss=loss, beta=0.1, label_smoothing=eps, **options)
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    collator = (PackedPairCollator if packed else PairCollator)(tokenizer.pad_token_id)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=pairs, data_collator=collator,
                         processing_class=tokenizer, dpo_cfg=cfg, ref_model=ref)
    policy.train()
    batch = collator([dict(p) for p in pairs])
    loss_value = trainer.compute_loss(policy, batch)
    loss_value.backward()
    metrics = {k: v[0] for k, v in trainer._stored["train"].items()}
    return loss_value.item(), metrics, _grads(policy)


def trl_side(base, policy, tokenizer, pairs, loss_types, weights, eps, tmp_path, **trl_options):
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.1, loss_type=loss_types,
                     loss_weights=weights, label_smoothing=eps, max_length=None,
                     per_device_train_batch_size=len(pairs), bf16=False, **trl_options)
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


# Every TRL 1.16 loss_type (issue 27), through dpokit's packed path. eps: label smoothing where the loss reads it
# (robust, exo_pair, aot, aot_unpaired; TRL's sigmoid ignores it, so it stays 0 there).
ALL_TRL = [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("exo_pair", 0.1), ("nca_pair", 0.0), ("robust", 0.2),
           ("bco_pair", 0.0), ("sppo_hard", 0.0), ("aot", 0.1), ("aot_unpaired", 0.1), ("apo_zero", 0.0),
           ("apo_down", 0.0), ("discopop", 0.0), ("sft", 0.0), ("sigmoid_norm", 0.0)]
# (loss, eps, dpokit train options): each f-divergence, LD-DPO, WPO, a two-loss combination (with an option too)
OPTIONS = [("sigmoid", 0.0, {"f_divergence": "forward_kl"}), ("sigmoid", 0.0, {"f_divergence": "js_divergence"}),
           ("sigmoid", 0.0, {"f_divergence": "alpha_divergence", "f_alpha": 0.5}),
           ("discopop", 0.0, {"f_divergence": "js_divergence", "discopop_tau": 0.5}),
           ("sigmoid", 0.0, {"ld_alpha": 0.5}), ("ipo", 0.0, {"ld_alpha": 0.5}),
           ("sigmoid", 0.0, {"use_weighting": True}), ("apo_zero:1.0,sigmoid:0.5", 0.0, {"use_weighting": True}),
           ("nca_pair:1.0,sigmoid_norm:0.5", 0.0, {}), ("apo_down:0.7,bco_pair:0.3", 0.0, {"ld_alpha": 0.5}),
           ("sigmoid:1.0,sft:0.5", 0.0, {"ld_alpha": 0.5})]  # sft: the NLL of every chosen token, unweighted


def _check_parity(loss, eps, options, tiny_llama, tmp_path):
    """One batch through TRL, dpokit padded and dpokit packed: the loss, rewards and every gradient within 1e-5 of
    TRL's. The one exception is discopop at its default tau 0.05 through the packed path (sigma(beta h / tau)
    multiplies the fp32 rounding of each ~-100 log-prob sum by 20): there TRL's own gradient is 2.7e-5 from the
    fp64 answer, and `test_discopop_packed_gradient_is_closer_to_fp64_than_trls` shows dpokit's is closer.
    Returns the worst packed gradient error against TRL and the packed-vs-padded gap."""
    from dpokit.train.losses import parse_loss_spec
    from dpokit.train.trl_engine import trl_loss_options

    base, tokenizer = tiny_llama
    pairs = _pairs(tokenizer)
    terms = parse_loss_spec(loss)
    cfg = TrainConfig(loss=loss, beta=0.1, label_smoothing=eps, **options)
    torch.manual_seed(0)
    trl_loss, trl_m, trl_g = trl_side(base, _perturbed(base), tokenizer, pairs, [trl_loss_names()[n] for n, _ in terms],
                                      [w for _, w in terms], eps, tmp_path, **trl_loss_options(cfg))
    grads = {}
    for packed in (False, True):
        ours_loss, ours_m, grads[packed] = dpokit_side(base, _perturbed(base), tokenizer, pairs, loss, eps,
                                                       tmp_path / str(packed), packed=packed, **options)
        assert ours_loss == pytest.approx(trl_loss, rel=1e-5), packed
        keys = ["logps/chosen", "logps/rejected"] + (["rewards/accuracies"] if needs_reference(terms) else [])
        for key in keys:
            assert ours_m[key] == pytest.approx(trl_m[key], rel=1e-5, abs=1e-7), (packed, key)
        # A reward is beta times the difference of two fp32 sums of ~-100 (an ulp there is 1e-5): compared at 1e-6
        # of the log-probs' size (padded, they agree bit for bit in practice).
        scale = 1e-6 * 0.1 * max(abs(trl_m["logps/chosen"]), abs(trl_m["logps/rejected"]))
        for key in ["rewards/chosen", "rewards/rejected", "rewards/margins"] if needs_reference(terms) else []:
            assert ours_m[key] == pytest.approx(trl_m[key], abs=scale), (packed, key)
        assert set(grads[packed]) == set(trl_g)
    padded_gap = max(_grad_gap(grads[False], trl_g).values())
    assert padded_gap < 1e-5, ("padded", _grad_gap(grads[False], trl_g))
    packed_gap = max(_grad_gap(grads[True], trl_g).values())
    layout = max(_grad_gap(grads[True], grads[False]).values())
    if loss != "discopop" or options.get("discopop_tau", 0.05) >= 0.5:
        assert packed_gap < 1e-5, ("packed", packed_gap, "layout", layout)
    return packed_gap, layout


def _grad_gap(a: dict, b: dict) -> dict:
    """Relative error of each parameter's gradient tensor, |a - b| / |b| (elementwise, a near-zero entry of a
    65k-entry embedding gradient can differ by float noise in relative terms)."""
    return {name: ((a[name] - b[name]).norm() / b[name].norm().clamp(min=1e-12)).item() for name in b}


@pytest.mark.parametrize("loss,eps", ALL_TRL)
def test_every_trl_loss_type_matches_trl_through_the_packed_path(loss, eps, tiny_llama, tmp_path):
    """Loss, rewards/* and every gradient equal TRL's on one batch (issue 27 must-show 1). bco_pair: TRL 1.16 keeps
    no running reward mean (older TRL shifted by one), so there is no first-batch special case to match."""
    assert {n for n, _ in ALL_TRL} == set(trl_loss_names().values())
    _check_parity(loss, eps, {}, tiny_llama, tmp_path)


def test_discopop_packed_gradient_is_closer_to_fp64_than_trls(tiny_llama, tmp_path):
    """discopop at tau 0.05 reads sigma(20 beta h): a log-prob sum's fp32 rounding (an ulp of -150 is 1.5e-5) comes
    back 20 times larger in the gradient, so two fp32 implementations summing in different orders cannot agree to
    1e-5. The judge is then the fp64 answer (dpokit's padded path on the same model in float64, which equals TRL's
    math): dpokit's packed fp32 gradient (sequence sums accumulated in fp64, `dpokit.core.packing.slot_sums`) is
    at least as close to it as TRL's fp32 gradient. Measured 2026-12-03: dpokit 1.3e-5, TRL 2.7e-5."""
    from dpokit.train.trl_engine import trl_loss_options

    base, tokenizer = tiny_llama
    pairs = _pairs(tokenizer)
    torch.manual_seed(0)
    _, _, trl_g = trl_side(base, _perturbed(base), tokenizer, pairs, ["discopop"], [1.0], 0.0, tmp_path,
                           **trl_loss_options(TrainConfig(loss="discopop", beta=0.1)))
    _, _, packed = dpokit_side(base, _perturbed(base), tokenizer, pairs, "discopop", 0.0, tmp_path / "packed",
                               packed=True)
    base64 = copy.deepcopy(base).double()
    _, _, exact = dpokit_side(base64, _perturbed(base64), tokenizer, pairs, "discopop", 0.0, tmp_path / "fp64")

    def worst(grads):
        return max(((grads[n].double() - g).norm() / g.norm()).item() for n, g in exact.items())

    ours, trls = worst(packed), worst(trl_g)
    assert ours <= trls, (ours, trls)
    assert ours < 5e-5  # and both are fp32-close to the exact answer


@pytest.mark.parametrize("loss,eps,options", OPTIONS, ids=[f"{c[0]}-{'-'.join(map(str, c[2].values())) or 'plain'}"
                                                            for c in OPTIONS])
def test_every_trl_loss_option_matches_trl_through_the_packed_path(loss, eps, options, tiny_llama, tmp_path):
    """f_divergence (each), ld_alpha 0.5, use_weighting and two-loss combinations: equal to TRL with its own
    names for the options (f_divergence_type, f_alpha_divergence_coef, ld_alpha, use_weighting, discopop_tau).
    (use_weighting with sft is not compared: TRL 1.16 raises there, multiplying an expanded tensor in place.)"""
    _check_parity(loss, eps, options, tiny_llama, tmp_path)


def test_packed_log_probs_differ_from_padded_only_by_fp32_summation(tiny_llama):
    """Why the packed and TRL's sequence log-probs can differ at all (and discopop's gradients by more than 1e-5): the
    packed forward's per-token log-probs equal the padded (TRL's) ones within 1e-6, and their exact (fp64-summed)
    sequence sums within 2e-6; what is left is fp32 rounding of a ~-100..-170 sum (an ulp there is 7.6e-6 to
    1.5e-5), which TRL's own fp32 sum carries too: it sits up to a few ulp from the exact sum of its own terms
    (measured 1.6e-5 here). dpokit's packed sums are accumulated in fp64 (`slot_sums`), so they carry half an ulp;
    discopop at tau 0.05 (sigma(20 beta h)) turns TRL's few ulp into a 2.7e-5 relative gradient error."""
    from dpokit.core.batching import token_logps
    from dpokit.core.packing import PackedPairCollator, packed_token_logps

    base, tokenizer = tiny_llama
    pairs = _pairs(tokenizer)
    packed_batch = PackedPairCollator(tokenizer.pad_token_id)([dict(p) for p in pairs])
    padded = PairCollator(tokenizer.pad_token_id)([dict(p) for p in pairs])
    mask = padded["loss_mask"][:, 1:].bool()
    rows, cols = mask.nonzero(as_tuple=True)
    for model in (_perturbed(base).eval(), base):
        with torch.no_grad():
            per_token, _ = packed_token_logps(model, packed_batch)
            logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            ref_tokens = token_logps(logits[:, :-1][rows, cols], padded["input_ids"][:, 1:][rows, cols])
        # padded tokens come row by row (slot order), each response in order; packed ones sorted the same way
        order = (packed_batch["score_slot"] * (mask.shape[1] + 1) + packed_batch["score_index"]).argsort()
        assert torch.equal(packed_batch["score_slot"][order], rows)
        per_token = per_token[order]
        assert (per_token - ref_tokens).abs().max().item() < 1e-6
        exact = torch.zeros(mask.shape[0], dtype=torch.float64).index_add(0, rows, per_token.double())
        exact_ref = torch.zeros(mask.shape[0], dtype=torch.float64).index_add(0, rows, ref_tokens.double())
        assert (exact - exact_ref).abs().max().item() < 2e-6
        dense = torch.zeros(mask.shape, dtype=torch.float32)
        dense[rows, cols] = ref_tokens
        fp32_sum = dense.sum(-1)  # TRL's (and dpokit padded's) reduction
        ulp = torch.finfo(torch.float32).eps * exact_ref.abs()
        assert ((fp32_sum.double() - exact_ref).abs() <= 4 * ulp).all()
