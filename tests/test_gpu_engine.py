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


def scored_logps(model, batch, chunked: bool, chunk: int = 1024, keep: int = 2**26):
    """Per scored token log-probs of a packed batch: the chunked head, or the full logits of the whole model."""
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False)
    rows, pos, tgt = batch["score_row"], batch["score_pos"], batch["score_target"]
    if not chunked:
        return token_logps(model(**kwargs).logits[rows, pos], tgt)
    plan = head_plan(model)
    assert isinstance(plan, HeadPlan), plan
    hidden = plan.decoder(**kwargs).last_hidden_state
    return chunked_token_logps(hidden[rows, pos], plan.head, tgt, chunk=chunk, softcap=plan.softcap,
                               keep_logits_max=keep)


def compare_heads(model, pairs, pad_id, chunk, keep=2**26):
    batch = PackedPairCollator(pad_id)(pairs)
    slot, n = batch["score_slot"], 2 * len(pairs)
    out = {}
    for chunked in (False, True):
        model.zero_grad()
        per_token = scored_logps(model, batch, chunked, chunk, keep)
        sums = torch.zeros(n).index_add(0, slot, per_token)
        (sums * torch.linspace(-1, 2, n)).sum().backward()  # a gradient that differs per pair
        out[chunked] = (sums.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    (full, g_full), (chunk_sums, g_chunk) = out[False], out[True]
    assert torch.allclose(full, chunk_sums, atol=TOL, rtol=1e-6), (full, chunk_sums)
    assert g_full.keys() == g_chunk.keys() and g_full
    worst = max((g_full[k] - g_chunk[k]).abs().max().item() for k in g_full)
    assert worst < TOL, worst


@pytest.mark.parametrize("chunk,keep", [(1024, 2**26), (1024, 0), (7, 0)], ids=["kept", "recompute", "chunks"])
def test_chunked_head_equals_full_logits_sums_and_grads(model_and_pad, chunk, keep):
    """Per-pair sums and every parameter's gradient: logits kept for backward (small batches), recomputed there
    (keep 0: as large GPU batches do), and in 7-token chunks that cut through pairs."""
    model, pad_id = model_and_pad
    compare_heads(perturbed(model), make_pairs(MIXED, model.config.vocab_size), pad_id, chunk, keep)


def test_chunked_head_soft_capping_equals_full_logits():
    """Gemma-2 soft-caps its logits (cap * tanh(logits / cap)); the chunked head does the same, gradients too."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0,
                          pad_token_id=0, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config)
    assert head_plan(model).softcap == 2.0
    compare_heads(model.train(), make_pairs(MIXED, 96), 0, chunk=5, keep=0)


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
                lp = (chunked_token_logps(hidden, head, targets, chunk=4, keep_logits_max=0) if chunked
                      else token_logps(head(hidden), targets))
            (lp * weights).sum().backward()
            grads.append((lp.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()))
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=tol, rtol=tol), (autocast, (a - b).abs().max())


def test_head_plan_names_why_a_model_keeps_full_logits():
    from transformers import AutoModelForCausalLM, BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    assert "bloom" in head_plan(bloom)


# ------------------------------------------------------------------------------------------------ attention layouts
from dpokit.core.attention import (  # noqa: E402
    flex_block_mask,
    flex_mask_mod,
    varlen_attention_forward,
    varlen_reference,
)

LAYOUT_SHAPES = [MIXED, [(6, 4, 5)], [(0, 5, 3)], [(1, 2, 4), (3, 1, 1)]]


@pytest.mark.parametrize("shapes", LAYOUT_SHAPES, ids=["mixed", "one", "empty-prompt", "one-token-prompt"])
def test_flex_mask_equals_pack_pairs_dense_mask(shapes):
    """mask_mod evaluated on every (row, query, key) of the batch equals pack_pairs' dense mask exactly, padding
    included; the BlockMask built from it keeps every block that holds an allowed cell."""
    from torch.nn.attention.flex_attention import create_mask

    pairs = make_pairs(shapes, 50)
    dense = pack_pairs(pairs, 0)
    rows, width = dense["input_ids"].shape
    mask_mod = flex_mask_mod(dense["document_ids"], dense["segment_ids"])
    assert torch.equal(create_mask(mask_mod, rows, None, width, width, device="cpu"), dense["attention_mask"])
    # the flex layout: rows bucketed to a multiple of 128 (the same rows as dense at that width), no dense mask
    flex = pack_pairs(pairs, 0, attention="flex")
    bucketed = pack_pairs(pairs, 0, pad_to_multiple_of=128)
    assert "attention_mask" not in flex and flex["input_ids"].shape[1] == 128
    assert torch.equal(flex["input_ids"], bucketed["input_ids"])
    block = flex_block_mask(flex["document_ids"], flex["segment_ids"])
    rows = flex["input_ids"].shape[0]
    assert block.shape == (rows, 1, 128, 128)
    assert torch.equal(create_mask(block.mask_mod, rows, None, 128, 128, device="cpu"), bucketed["attention_mask"])


def plain_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d)) v over the allowed keys; q (T, H, D), allowed (T, Tk) bool."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("shapes", LAYOUT_SHAPES, ids=["mixed", "one", "empty-prompt", "one-token-prompt"])
def test_varlen_index_gives_per_segment_attention(shapes):
    """Attention over the varlen layout (key/value index, cu_seq_q/k, bottom-right causal per segment; GQA 4 query
    heads on 2 key/value heads) equals, for every token, plain softmax attention over its own unpadded
    prompt + response sequence."""
    pairs = make_pairs(shapes, 50)
    batch = pack_pairs(pairs, 0, attention="varlen")
    layout, total = batch["varlen"], batch["input_ids"].shape[1]
    assert batch["input_ids"].shape[0] == 1 and total == sum(len(p["prompt_ids"]) + len(p["chosen_ids"])
                                                             + len(p["rejected_ids"]) for p in pairs)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, h, 8, generator=gen) for h in (4, 2, 2))
    out = varlen_reference(q, k[layout["kv_index"]], v[layout["kv_index"]], layout["cu_q_list"], layout["cu_k_list"])
    assert layout["max_q"] == max(b - a for a, b in zip(layout["cu_q_list"], layout["cu_q_list"][1:]))
    start = 0
    k4, v4 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for p in pairs:
        lp, lc, lr = len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])
        for own in (list(range(start, start + lp + lc)), [*range(start, start + lp), *range(start + lp + lc,
                                                                                               start + lp + lc + lr)]):
            idx = torch.tensor(own)
            want = plain_attention(q[idx], k4[idx], v4[idx], torch.ones(len(own), len(own), dtype=torch.bool).tril())
            assert torch.allclose(out[idx], want, atol=1e-6), (p, (out[idx] - want).abs().max())
        start += lp + lc + lr


def test_varlen_attention_function_takes_transformers_layout():
    """The AttentionInterface function: (1, H, T, D) in, (1, T, H, D) out, the same as the reference."""
    batch = pack_pairs(make_pairs(MIXED, 50), 0, attention="varlen")
    layout, total = batch["varlen"], batch["input_ids"].shape[1]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, total, 8, generator=gen) for h in (4, 2, 2))
    out, weights = varlen_attention_forward(None, q, k, v, None, scaling=0.3, dpokit_varlen=layout)
    idx = layout["kv_index"]
    want = varlen_reference(q[0].transpose(0, 1), k[0].transpose(0, 1)[idx], v[0].transpose(0, 1)[idx],
                            layout["cu_q_list"], layout["cu_k_list"], scale=0.3)
    assert weights is None and out.shape == (1, total, 4, 8) and torch.allclose(out[0], want)


def test_packed_training_with_varlen_equals_padded(model_and_pad):
    """Log-probs, DPO loss and gradients through the model with the varlen layout (one flattened row, the attention
    function with the CPU reference in place of the CUDA kernel) equal the padded path's."""
    from dpokit.core.batching import PairCollator, sequence_logps
    from dpokit.core.packing import packed_sequence_logps
    from test_packing import dpo_loss

    model, pad_id = model_and_pad
    policy, ref = perturbed(model), copy.deepcopy(model).eval()
    pairs = make_pairs(MIXED, model.config.vocab_size)
    results = {}
    for name, batch, fn in (("padded", PairCollator(pad_id)(pairs), sequence_logps),
                            ("varlen", pack_pairs(pairs, pad_id, attention="varlen"), packed_sequence_logps)):
        policy.zero_grad()
        loss, logps = dpo_loss(policy, ref, batch, fn)
        loss.backward()
        results[name] = (loss.detach(), logps, {n: p.grad.clone() for n, p in policy.named_parameters()
                                                if p.grad is not None})
    (loss_a, lp_a, g_a), (loss_b, lp_b, g_b) = results["padded"], results["varlen"]
    for key in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        assert torch.allclose(lp_a[key].detach(), lp_b[key].detach(), atol=TOL, rtol=1e-6), key
    assert abs(float(loss_a) - float(loss_b)) < TOL
    assert g_a.keys() == g_b.keys() and max((g_a[n] - g_b[n]).abs().max().item() for n in g_a) < TOL


@pytest.mark.slow  # CPU flex_attention compiles for minutes
def test_flex_forward_equals_padded_on_llama(tiny_llama):
    """transformers' flex_attention with the explicit BlockMask gives the padded log-probs (forward only: CPU flex
    has no backward), and the model's own attention implementation is back afterwards."""
    from dpokit.core.batching import PairCollator, sequence_logps
    from dpokit.core.packing import packed_sequence_logps

    model, tok = tiny_llama
    pairs = make_pairs(MIXED, model.config.vocab_size)
    with torch.no_grad():
        padded = sequence_logps(model.eval(), PairCollator(tok.pad_token_id)(pairs))
        flex = packed_sequence_logps(model, pack_pairs(pairs, tok.pad_token_id, attention="flex"))
    for key in ("chosen", "rejected"):
        assert torch.allclose(padded[key], flex[key], atol=TOL, rtol=1e-6), key
    assert model.config._attn_implementation == "dpokit"  # dpokit's function for good: sdpa for every other forward


def test_flex_self_check_names_why_gpt2_cannot_use_it(tiny_gpt2):
    from dpokit.core.packing import packing_self_check

    gpt2, tok = tiny_gpt2
    reason = packing_self_check(gpt2, make_pairs([(4, 3, 2)], 50)[0], tok.pad_token_id, attention="flex")
    assert reason is not None and "BlockMask" in reason and "\n" not in reason
    assert gpt2.config._attn_implementation in ("sdpa", "dpokit")  # dpokit's: sdpa for every other forward


# --------------------------------------------------------------------------------------------- backend choice, syncs
def test_attention_choice_on_cpu(tiny_llama, caplog):
    """auto and dense pack with the dense mask on a CPU; varlen asked for on a CPU falls back to dense with a
    one-line warning; padded gives padded batches."""
    import logging

    from dpokit.core.batching import PairCollator
    from dpokit.core.config import TrainConfig
    from dpokit.train.packing import attention_candidates, choose_collator

    model, tok = tiny_llama
    pairs = make_pairs([(4, 3, 2), (5, 2, 6)], model.config.vocab_size)
    assert attention_candidates(TrainConfig(), cuda=True) == ["varlen", "flex", "dense"]
    assert attention_candidates(TrainConfig(layout="flex"), cuda=True) == ["flex", "dense"]
    assert attention_candidates(TrainConfig(layout="padded"), cuda=True) == []
    for attention in ("auto", "dense"):
        collator, _ = choose_collator(TrainConfig(layout=attention), model, None, pairs, tok.pad_token_id)
        assert isinstance(collator, PackedPairCollator) and collator.attention == "dense"
    with caplog.at_level(logging.WARNING):
        collator, _ = choose_collator(TrainConfig(layout="varlen"), model, None, pairs, tok.pad_token_id)
    assert isinstance(collator, PackedPairCollator) and collator.attention == "dense"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["train.layout: varlen not used, trying dense: varlen needs CUDA (FlashAttention kernels)"]
    assert collator.passed_over == {"varlen": "varlen needs CUDA (FlashAttention kernels)"}
    collator, _ = choose_collator(TrainConfig(layout="padded"), model, None, pairs, tok.pad_token_id)
    assert isinstance(collator, PairCollator) and collator.attention == "padded"


def test_train_summary_records_the_attention_backend_and_why_others_were_passed_over(tmp_path):
    import json

    from conftest import tiny_config
    from dpokit.core.config import config_from_dict
    from dpokit.train.trainer import run_training

    for attention, want in (("varlen", {"backend": "dense",
                                        "passed_over": {"varlen": "varlen needs CUDA (FlashAttention kernels)"}}),
                            ("padded", {"backend": "padded", "passed_over": {}})):
        cfg = config_from_dict(tiny_config(tmp_path, train={"max_steps": 1, "attention": attention},
                                           eval={"enabled": False}, output={"dir": str(tmp_path / attention)}))
        run_dir = run_training(cfg).run_dir
        assert json.loads((run_dir / "train_summary.json").read_text())["attention"] == want


def tiny_trainer(model, tok, tmp_path, callbacks=()):
    from transformers import TrainingArguments

    from dpokit.core.config import TrainConfig
    from dpokit.train.trainer import DPOTrainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, logging_nan_inf_filter=False)
    policy = copy.deepcopy(model).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=make_pairs(MIXED[:6], model.config.vocab_size),
                         data_collator=PackedPairCollator(tok.pad_token_id), dpo_cfg=TrainConfig(), ref_model=ref,
                         callbacks=list(callbacks))
    return trainer, policy


def test_non_finite_gradient_stops_training_naming_the_step(tiny_llama, tmp_path):
    """The loss is finite, one parameter's gradient is not: the fused check (the total gradient norm) stops the
    run before the optimizer applies it."""
    from dpokit.core.errors import UserError

    model, tok = tiny_llama
    trainer, policy = tiny_trainer(model, tok, tmp_path)
    next(policy.parameters()).register_hook(lambda g: g * float("inf"))
    with pytest.raises(UserError, match=r"non-finite gradient at step 0; likely causes: learning rate too high"):
        trainer.train()


def test_non_finite_loss_stops_training_naming_the_step(tiny_llama, tmp_path):
    """NaN weights after step 1: the step's loss is NaN and the run stops at step 1 with the loss message; the
    metrics logged at step 1 (read from device tensors at the logging step) are finite numbers."""
    from transformers import TrainerCallback

    from dpokit.core.errors import UserError

    class PoisonAtStep1(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    model.get_output_embeddings().weight.fill_(float("nan"))

    logged = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs))

    model, tok = tiny_llama
    trainer, _ = tiny_trainer(model, tok, tmp_path, callbacks=[PoisonAtStep1(), Keep()])
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 1; likely causes"):
        trainer.train()
    assert len(logged) == 1 and isinstance(logged[0]["rewards/accuracies"], float)
    assert logged[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 0: policy = reference, ln 2


# ------------------------------------------------------------------ wrapped models, gradient checkpointing (issue 32)
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from dpokit.core.attention import EMULATE_ENV  # noqa: E402


@pytest.fixture
def gloo_group():
    """A one-process gloo group, as DDP needs (world size 1 in this process)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class DeepSpeedShaped(torch.nn.Module):
    """What dpokit sees of DeepSpeed's engine: the model as `.module`, the engine's own dict as `.config`, forward
    through the module."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def padded_and_packed(policy, scored, ref, pairs, pad_id, layout):
    """(loss, logps, grads) of the padded path on `policy` and of the packed `layout` on `scored` (the same
    weights, maybe wrapped or checkpointed)."""
    from dpokit.core.batching import PairCollator, sequence_logps
    from dpokit.core.packing import packed_sequence_logps
    from test_packing import dpo_loss

    results = []
    for model, batch, fn in ((policy, PairCollator(pad_id)(pairs), sequence_logps),
                             (scored, pack_pairs(pairs, pad_id, attention=layout), packed_sequence_logps)):
        model.zero_grad()
        loss, logps = dpo_loss(model, ref, batch, fn)
        loss.backward()
        params = model.named_parameters()
        results.append((loss.detach(), {k: v.detach() for k, v in logps.items()},
                        {n.removeprefix("module."): p.grad.clone() for n, p in params if p.grad is not None}))
    return results


def assert_same(padded, packed, tol=TOL):
    (loss_a, lp_a, g_a), (loss_b, lp_b, g_b) = padded, packed
    for key in ("chosen", "rejected"):
        assert torch.allclose(lp_a[key], lp_b[key], atol=tol, rtol=1e-6), (key, (lp_a[key] - lp_b[key]).abs().max())
    assert abs(float(loss_a) - float(loss_b)) < tol, (float(loss_a), float(loss_b))
    assert g_a.keys() == g_b.keys() and g_a
    worst = max((g_a[n] - g_b[n]).abs().max().item() for n in g_a)
    assert worst < tol, worst


@pytest.mark.parametrize("wrapper", ["ddp", "deepspeed-shaped", "ddp-peft"])
def test_wrapped_model_gets_the_varlen_attention_and_keeps_the_chunked_head(tiny_llama, gloo_group, wrapper):
    """Behind DDP (a real torch DDP, gloo), an object shaped like DeepSpeed's engine (a dict `.config`) and DDP over
    PEFT: the PretrainedConfig is found, the varlen layout gets dpokit's attention (log-probs, loss and gradients
    equal the padded path's), the chunked head stays on (the LM head module computes no logits), and the forward
    goes through the wrapper."""
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    model, tok = tiny_llama
    policy, ref = perturbed(model), copy.deepcopy(model).eval()
    if wrapper == "ddp-peft":
        policy = get_peft_model(policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                   init_lora_weights=False))
    wrapped = DeepSpeedShaped(policy) if wrapper == "deepspeed-shaped" else DistributedDataParallel(policy)
    plan = head_plan(wrapped)
    assert isinstance(plan, HeadPlan), plan
    through = []
    wrapped.register_forward_pre_hook(lambda module, args: through.append(type(module).__name__))
    logits_sizes = []
    plan.head.register_forward_hook(lambda module, args, out: logits_sizes.append(out.shape[-2]))
    padded, packed = padded_and_packed(policy, wrapped, ref, make_pairs(MIXED, model.config.vocab_size),
                                       tok.pad_token_id, "varlen")
    assert_same(padded, packed)
    assert through == [type(wrapped).__name__]  # one forward, through the wrapper
    assert logits_sizes[-1] == 0  # the packed forward: no position through the full LM head
    assert policy.get_base_model().config._attn_implementation == "dpokit" if wrapper == "ddp-peft" else \
        policy.config._attn_implementation == "dpokit"


@pytest.mark.parametrize("layout", ["varlen", "flex"])
def test_gradient_checkpointing_recomputes_with_the_packed_layout(tiny_llama, layout, monkeypatch):
    """Non-reentrant gradient checkpointing recomputes every decoder layer in backward, after the packed forward
    returned: dpokit's attention function (registered for good) must take the varlen / flex path there too. The
    kernels are the CPU emulation (EMULATE_ENV); the gradients equal the padded path's without checkpointing."""
    monkeypatch.setenv(EMULATE_ENV, "1")
    model, tok = tiny_llama
    policy, ref = perturbed(model), copy.deepcopy(model).eval()
    checkpointed = perturbed(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.is_gradient_checkpointing
    padded, packed = padded_and_packed(policy, checkpointed, ref, make_pairs(MIXED, model.config.vocab_size),
                                       tok.pad_token_id, layout)
    assert_same(padded, packed)


@pytest.mark.slow
def test_two_gloo_processes_with_varlen_equal_one_padded_process(tiny_llama, tmp_path):
    """2 processes (torch.distributed.run, gloo, DDP; tests/ddp_varlen_worker.py), each scoring half of the pairs
    with the varlen layout through the DDP wrapper, give the loss and the all-reduced gradients of one process
    scoring every pair padded, within 1e-5."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny_llama
    pairs = make_pairs(MIXED + [(3, 4, 2)], model.config.vocab_size)  # 8 pairs: 4 per rank
    perturbed(model).save_pretrained(tmp_path / "models" / "policy")
    model.save_pretrained(tmp_path / "models" / "ref")
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    worker = Path(__file__).parent / "ddp_varlen_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path / "models"), str(tmp_path / "pairs.json"), str(tok.pad_token_id), str(tmp_path / "out.pt")]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = torch.load(tmp_path / "out.pt")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "policy", dtype=torch.float32).train()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "ref", dtype=torch.float32).eval()
    (loss, _, grads), _ = padded_and_packed(policy, policy, ref, pairs, tok.pad_token_id, "varlen")
    assert abs(float(loss) - float(two["loss"])) < TOL, (float(loss), float(two["loss"]))
    assert grads.keys() == two["grads"].keys()
    worst = max((grads[n] - two["grads"][n]).abs().max().item() for n in grads)
    assert worst < TOL, worst


# --------------------------------------------------------------------------------- mixed precision (issue 32)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class MatmulDtypes(TorchDispatchMode):
    """The input dtype of every matmul (aten mm / addmm / bmm, after autocast's casts) per region: the forward of
    a module given to `watch`, or "head" for a [tokens x vocab] product outside them (the chunked head)."""

    MATMULS = {"mm": 0, "addmm": 1, "bmm": 0}  # which argument is the left operand

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.regions, self.seen = vocab, [], {}

    def watch(self, module, name):
        module.register_forward_pre_hook(lambda m, args: self.regions.append(name))
        module.register_forward_hook(lambda m, args, out: self.regions.pop() and None)  # None: output unchanged

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        arg = self.MATMULS.get(func._overloadpacket.__name__)
        if arg is not None:
            region = self.regions[-1] if self.regions else (
                "head" if out.shape[-1] == self.vocab and out.numel() else None)
            if region:
                self.seen.setdefault(region, set()).add(args[arg].dtype)
        return out


def test_bf16_autocast_reaches_decoder_head_and_reference(tiny_llama, tmp_path):
    """train.precision bf16 with fp32 master weights (Trainer's bf16 on the CPU): one training step's matmuls in
    the policy's decoder, the chunked head and the reference model all run in bf16, and the loss stays finite."""
    from transformers import TrainingArguments

    from dpokit.core.config import TrainConfig
    from dpokit.train.trainer import DPOTrainer

    model, tok = tiny_llama
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-3,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, bf16=True,
                             remove_unused_columns=False, logging_nan_inf_filter=False)
    policy, ref = perturbed(model), copy.deepcopy(model).eval().requires_grad_(False)
    trainer = DPOTrainer(model=policy, args=args, train_dataset=make_pairs(MIXED[:4], model.config.vocab_size),
                         data_collator=PackedPairCollator(tok.pad_token_id), dpo_cfg=TrainConfig(), ref_model=ref)
    recorder = MatmulDtypes(model.config.vocab_size)
    recorder.watch(policy.model, "decoder")
    recorder.watch(ref.model, "reference")
    with recorder:
        out = trainer.train()
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # fp32 master weights
    assert recorder.seen == {"decoder": {torch.bfloat16}, "head": {torch.bfloat16}, "reference": {torch.bfloat16}}
    assert torch.isfinite(torch.tensor(out.training_loss))


@pytest.mark.parametrize("layout", ["varlen", "flex"])
def test_qkv_reach_the_attention_kernels_in_one_dtype_under_autocast(tiny_llama, layout, monkeypatch):
    """LLaMA's rotary embedding leaves q and k in fp32 while v is bf16 under autocast (fp32 weights); the varlen
    and flex wrappers hand the kernel (here the CPU emulation) all three in bf16, and the chunked head's
    log-probs stay fp32."""
    from dpokit.core import attention
    from dpokit.core.packing import packed_sequence_logps

    monkeypatch.setenv(EMULATE_ENV, "1")
    seen = []

    def recording(kernel, at):
        def wrapper(*args, **kwargs):
            seen.append(tuple(a.dtype for a in args[at:at + 3]))
            return kernel(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(attention, "varlen_reference", recording(attention.varlen_reference, 0))
    monkeypatch.setattr(attention, "_flex_kernel", recording(attention._flex_kernel, 1))
    model, tok = tiny_llama
    policy = perturbed(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_sequence_logps(policy, pack_pairs(make_pairs(MIXED, model.config.vocab_size), tok.pad_token_id,
                                                       attention=layout))
    assert seen and set(seen) == {(torch.bfloat16,) * 3}, seen
    assert out["chosen"].dtype == torch.float32 and torch.isfinite(out["chosen"]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the training device differs from the loading one on CUDA")
def test_self_check_runs_on_the_training_device(tmp_path, monkeypatch):
    """The start-up self-check tests the policy where training runs (the Trainer placed it on CUDA first), with
    LoRA too; before, only the reference was moved and the policy was checked on the CPU."""
    from conftest import tiny_config
    from dpokit.core.config import config_from_dict
    from dpokit.train import packing as train_packing
    from dpokit.train.trainer import run_training

    devices = []
    real = train_packing.packing_self_check

    def recording(model, *args, **kwargs):
        devices.append(next(model.parameters()).device.type)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train_packing, "packing_self_check", recording)
    cfg = config_from_dict(tiny_config(tmp_path, train={"max_steps": 1, "lora": {"r": 4}}, eval={"enabled": False}))
    run_training(cfg)
    assert devices and set(devices) == {"cuda"}, devices


def test_eager_model_with_gradient_checkpointing_refuses_the_varlen_layout(tiny_llama):
    """An eager model is switched to dpokit's attention for the packed forward only, which checkpointing's
    recomputation would not see: refused with the reason instead of training on wrong gradients."""
    from dpokit.core.packing import packed_sequence_logps

    model, tok = tiny_llama
    eager = perturbed(model)
    eager.config._attn_implementation_internal = "eager"
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = pack_pairs(make_pairs(MIXED, model.config.vocab_size), tok.pad_token_id, attention="varlen")
    with pytest.raises(ValueError, match="gradient checkpointing needs model.attn_implementation sdpa"):
        packed_sequence_logps(eager, batch)
    assert eager.config._attn_implementation == "eager"
