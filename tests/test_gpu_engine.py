"""The GPU engine's pieces, checked on the CPU in fp32 (docs/gpu-engine.md): the chunked log-prob head equals the
full-logits path, the flex BlockMask equals pack_pairs' dense mask, the varlen key/value index gives per-segment
attention, and packed training through each backend equals padded training."""

import copy

import pytest
import torch

from dpokit.core.batching import token_logps
from dpokit.core.logp_head import HeadPlan, chunked_token_logps, head_plan
from dpokit.core.packing import PackedPairCollator, pack_pairs
from dpokit.train.trainer import disable_dropout
from test_packing import MIXED, make_pairs

TOL = 1e-5


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model_and_pad(request):
    model, tokenizer = request.getfixturevalue(request.param)
    return model, tokenizer.pad_token_id


def perturbed(model):
    """A train-mode copy moved away from the fixture's weights (own generator: the same in any test order)."""
    policy = copy.deepcopy(model).train()
    disable_dropout(policy)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return policy


def scored_logps(model, batch, chunked: bool, chunk: int = 1024):
    """Per scored token log-probs of a packed batch: the chunked head, or the full logits of the whole model."""
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False)
    rows, pos, tgt = batch["score_row"], batch["score_pos"], batch["score_target"]
    if not chunked:
        return token_logps(model(**kwargs).logits[rows, pos], tgt)
    plan = head_plan(model)
    assert isinstance(plan, HeadPlan), plan
    hidden = plan.decoder(**kwargs).last_hidden_state
    return chunked_token_logps(hidden[rows, pos], plan.head, tgt, chunk=chunk, softcap=plan.softcap)


def compare_heads(model, pairs, pad_id, chunk):
    batch = PackedPairCollator(pad_id)(pairs)
    slot, n = batch["score_slot"], 2 * len(pairs)
    out = {}
    for chunked in (False, True):
        model.zero_grad()
        per_token = scored_logps(model, batch, chunked, chunk)
        sums = torch.zeros(n).index_add(0, slot, per_token)
        (sums * torch.linspace(-1, 2, n)).sum().backward()  # a gradient that differs per pair
        out[chunked] = (sums.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    (full, g_full), (chunk_sums, g_chunk) = out[False], out[True]
    assert torch.allclose(full, chunk_sums, atol=TOL, rtol=1e-6), (full, chunk_sums)
    assert g_full.keys() == g_chunk.keys() and g_full
    worst = max((g_full[k] - g_chunk[k]).abs().max().item() for k in g_full)
    assert worst < TOL, worst


@pytest.mark.parametrize("chunk", [1024, 7])
def test_chunked_head_equals_full_logits_sums_and_grads(model_and_pad, chunk):
    """Per-pair sums and every parameter's gradient, one chunk or many (7 tokens: chunks cut through pairs)."""
    model, pad_id = model_and_pad
    compare_heads(perturbed(model), make_pairs(MIXED, model.config.vocab_size), pad_id, chunk)


def test_chunked_head_soft_capping_equals_full_logits():
    """Gemma-2 soft-caps its logits (cap * tanh(logits / cap)); the chunked head does the same, gradients too."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0,
                          pad_token_id=0, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config)
    assert head_plan(model).softcap == 2.0
    compare_heads(model.train(), make_pairs(MIXED, 96), 0, chunk=5)


def test_chunked_head_with_bias_and_autocast_matches_reference():
    """A biased head, fp32 and bf16 autocast: same log-probs and gradients as log_softmax over the full logits
    computed the same way (bf16 matmul, fp32 log-softmax)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(13, 16, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    weights = torch.linspace(-1, 1, 13)
    for autocast in (False, True):
        tol = TOL if not autocast else 1e-2
        grads = []
        for chunked in (False, True):
            head.zero_grad()
            hidden.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                lp = (chunked_token_logps(hidden, head, targets, chunk=4) if chunked
                      else token_logps(head(hidden), targets))
            (lp * weights).sum().backward()
            grads.append((lp.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()))
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=tol, rtol=tol), (autocast, (a - b).abs().max())


def test_head_plan_names_why_a_model_keeps_full_logits():
    from transformers import AutoModelForCausalLM, BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    assert "bloom" in head_plan(bloom)
