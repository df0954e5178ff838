"""The fast sampler against the reference (`hf`, model.generate) and against the model's own probabilities."""

import math

import pytest
import torch
from scipy.stats import chi2_contingency

from dpokit.core.sampling import pick_tokens, prompt_text, sample
from dpokit.core.scoring import response_logps

PROMPTS = ["How was the sea?", "Tell me about the garden today.", "Hi",
           "Give a review of the movie we saw last night, please."]


def _chats(tokenizer):
    return [[{"role": "user", "content": p}] for p in PROMPTS] if tokenizer.chat_template else PROMPTS


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_greedy_fast_equals_hf_token_for_token(which, request):
    model, tok = request.getfixturevalue(which)
    kwargs = dict(num_samples=3, max_new_tokens=16, temperature=0.0, batch_size=6)
    hf = sample(model, tok, _chats(tok), engine="hf", **kwargs)
    fast = sample(model, tok, _chats(tok), engine="fast", **kwargs)
    assert [[s.response_ids for s in per] for per in fast] == [[s.response_ids for s in per] for per in hf]
    assert [[s.prompt_ids for s in per] for per in fast] == [[s.prompt_ids for s in per] for per in hf]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_sampled_token_logps_equal_a_teacher_forced_forward(which, request):
    model, tok = request.getfixturevalue(which)
    out = sample(model, tok, _chats(tok), num_samples=4, max_new_tokens=12, temperature=1.0, seed=3, batch_size=8)
    flat = [s for per in out for s in per]
    forced, counts = response_logps(model, [s.prompt_ids for s in flat], [s.response_ids for s in flat],
                                    tok.pad_token_id, batch_size=4)
    for s, total, n in zip(flat, forced, counts, strict=True):
        assert len(s.token_logps) == len(s.response_ids) == n
        assert abs(sum(s.token_logps) - total) < 1e-4 * max(n, 1)
    # Sequences stop at their first EOS and carry nothing after it.
    eos = tok.eos_token_id
    assert all(eos not in s.response_ids[:-1] for s in flat)


def test_first_token_distribution_matches_hf_and_the_model(tiny_llama):
    """2,000 first tokens per engine from one prompt: a chi-square test on the model's top tokens (the rest pooled)
    finds no difference between the engines, and each engine's counts fit the model's own probabilities."""
    model, tok = tiny_llama
    chat = [[{"role": "user", "content": "Tell me about the garden today."}]]
    n, temperature = 2000, 0.7
    counts = {}
    for engine in ("hf", "fast"):
        out = sample(model, tok, chat, num_samples=n, max_new_tokens=1, temperature=temperature, seed=11,
                     batch_size=500, engine=engine)[0]
        counts[engine] = torch.bincount(torch.tensor([s.response_ids[0] for s in out]), minlength=len(tok))
    ids = tok(prompt_text(chat[0], tok), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        probs = torch.softmax(model(**ids).logits[0, -1].float() / temperature, -1)
    top = probs.argsort(descending=True)[:12]

    def buckets(c):
        return [*(int(c[i]) for i in top), int(c.sum() - c[top].sum())]

    table = [buckets(counts["hf"]), buckets(counts["fast"])]
    assert chi2_contingency(table).pvalue > 1e-3
    expected = [float(probs[i]) * n for i in top] + [float(1 - probs[top].sum()) * n]
    for observed in table:
        stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
        assert stat < 45.3  # chi-square, 12 degrees of freedom, p = 1e-5


def test_pick_tokens_greedy_top_p_and_logps():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 0.0, 0.0]])
    tokens, logps = pick_tokens(logits, 0.0, 1.0, None)
    assert tokens.tolist() == [0, 1]
    assert torch.allclose(logps, torch.log_softmax(logits, -1)[[0, 1], [0, 1]])
    # top_p 0.5: row 0 keeps only token 0 (p = 0.63 >= 0.5); whatever the draw, token 0 is drawn.
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        tokens, _ = pick_tokens(logits, 1.0, 0.5, torch.rand(2, generator=gen))
        assert tokens[0] == 0
    # Inverting the CDF draws token i with probability p_i, also after temperature and with top_p.
    p = torch.softmax(logits[0], -1)
    for temperature, top_p, expected in [
        (1.0, 1.0, p),
        (0.5, 1.0, torch.softmax(logits[0] / 0.5, -1)),
        # top_p 0.9: the smallest prefix reaching 0.9 is tokens 0, 1, 2 (0.63 + 0.23 = 0.86 < 0.9), renormalised
        (1.0, 0.9, torch.tensor([p[0], p[1], p[2], 0.0]) / (p[0] + p[1] + p[2])),
    ]:
        draws, _ = pick_tokens(logits[:1].expand(8000, 4), temperature, top_p, torch.rand(8000, generator=gen))
        freq = torch.bincount(draws, minlength=4).float() / 8000
        assert torch.allclose(freq, expected, atol=0.02), (temperature, top_p, freq, expected)
    # Edges: u = 0 never picks a zero-probability first token; u just below 1 picks the last possible one.
    edge = torch.tensor([[-float("inf"), 0.0, 0.0, -float("inf")]])
    assert pick_tokens(edge, 1.0, 1.0, torch.tensor([0.0]))[0].item() == 1
    assert pick_tokens(edge, 1.0, 1.0, torch.tensor([0.999999]))[0].item() == 2
    assert pick_tokens(logits[:1], 1.0, 1.0, torch.tensor([0.0]))[1].item() == pytest.approx(
        torch.log_softmax(logits[0], -1)[0].item())


def test_same_seed_same_samples_for_two_models_and_rows_independent(tiny_llama):
    model, tok = tiny_llama
    chats = _chats(tok)
    a = sample(model, tok, chats, num_samples=2, max_new_tokens=10, seed=5, batch_size=8)
    b = sample(model, tok, chats, num_samples=2, max_new_tokens=10, seed=5, batch_size=8)
    c = sample(model, tok, chats, num_samples=2, max_new_tokens=10, seed=6, batch_size=8)
    assert [[s.response_ids for s in p] for p in a] == [[s.response_ids for s in p] for p in b]
    assert [[s.response_ids for s in p] for p in a] != [[s.response_ids for s in p] for p in c]
    assert all(math.isfinite(x) for per in a for s in per for x in s.token_logps)


def test_unknown_engine_is_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="engine"):
        sample(model, tok, ["Hi"], engine="vllm")


@pytest.mark.slow
def test_greedy_fast_equals_hf_on_smollm2():
    from dpokit.core.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", dtype="float32")
    kwargs = dict(num_samples=2, max_new_tokens=24, temperature=0.0, batch_size=8)
    hf = sample(model, tok, _chats(tok), engine="hf", **kwargs)
    fast = sample(model, tok, _chats(tok), engine="fast", **kwargs)
    assert [[s.response_ids for s in per] for per in fast] == [[s.response_ids for s in per] for per in hf]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_shared_prefix_prefill_gives_hf_tokens_and_exact_logps(which, request):
    """Prompts behind one system prompt: the shared tokens are prefilled once (a batch-1 forward of exactly the
    common prefix), and the answers and log-probs are still the model's own."""
    model, tok = request.getfixturevalue(which)
    system = "You are a cheerful assistant who always answers briefly, kindly and with a warm tone."
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in PROMPTS]
    prompts = chats if tok.chat_template else [system + " " + p for p in PROMPTS]
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        fast = sample(model, tok, prompts, num_samples=2, max_new_tokens=10, temperature=0.0, batch_size=8)
    finally:
        hook.remove()
    texts = [prompt_text(p, tok) for p in prompts]
    ids = [tok(t)["input_ids"] for t in texts]
    common = next(k for k in range(min(map(len, ids))) if len({x[k] for x in ids}) > 1)
    assert common >= 8 and shapes[0] == (1, common)  # the prefix alone, once
    assert shapes[1][0] == len(PROMPTS) and shapes[1][1] == max(len(x) for x in ids) - common
    hf = sample(model, tok, prompts, num_samples=2, max_new_tokens=10, temperature=0.0, batch_size=8, engine="hf")
    assert [[s.response_ids for s in per] for per in fast] == [[s.response_ids for s in per] for per in hf]
    assert [[s.prompt_ids for s in per] for per in fast] == [[s.prompt_ids for s in per] for per in hf]
    flat = [s for per in sample(model, tok, prompts, num_samples=3, max_new_tokens=8, seed=2, batch_size=12)
            for s in per]
    forced, _ = response_logps(model, [s.prompt_ids for s in flat], [s.response_ids for s in flat],
                               tok.pad_token_id, batch_size=4)
    for s, total in zip(flat, forced, strict=True):
        assert abs(sum(s.token_logps) - total) < 1e-4 * max(len(s.response_ids), 1)
