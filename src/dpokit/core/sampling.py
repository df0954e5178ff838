"""Sampling answers from a causal LM, behind one interface: `sample(model, tokenizer, prompts, ...)` returns, per
prompt, `num_samples` `Sample`s with token ids, text and (engine `fast`) per-token log-probs.

Engines (`engine=`):
- `fast` (default): each prompt is prefilled once and its KV cache forked for its samples, and a prefix that all
  prompts of a batch share (a chat template's system prompt) is prefilled once for the batch. A short decode loop
  of our own (no logits processors, no per-step mask rebuilding, a KV cache written in place) samples by
  inverting the CDF (one random number per row and step), stops a sequence at its first EOS and drops finished
  sequences from the batch, and records each token's log-probability under the model (temperature 1, no
  top_p), so KL needs no second forward.
- `hf`: `model.generate`, the reference the `fast` engine is tested against.

Seeds: each batch draws from a generator seeded by (seed, batch index), the same for every model, so base and tuned
models sampled with the same arguments see the same random numbers within an engine (`fast` draws a uniform for
every row and step of the batch, finished or not, so a row's randomness never depends on other rows). The two engines'
random streams differ: the same seed gives other samples under `hf` and `fast`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from dpokit.core.templates import is_conversational


def prompt_text(prompt, tokenizer, system_prompt: str | None = None) -> str:
    """A canonical prompt (string or messages) as the text the model continues."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


ENGINES = ("fast", "hf")


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, num_samples: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
             system_prompt: str | None = None, progress=None, engine: str = "fast") -> list[list[str]]:
    """`num_samples` completions per prompt (decoded, special tokens stripped). temperature 0 = greedy.

    Each batch reseeds torch from (seed, batch index), so two models sampled with the same arguments draw the same
    random numbers batch by batch.
    """
    samples = sample(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                     system_prompt=system_prompt, progress=progress, engine=engine)
    return [[s.text for s in per_prompt] for per_prompt in samples]


@dataclass
class Sample:
    """One generated answer: the unpadded prompt ids, the generated ids (up to and including the first EOS), the
    decoded text, and (engine `fast`) the log-probability of each generated id under the model at temperature 1."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    token_logps: list[float] | None = field(default=None, repr=False)


def _trim(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS: what follows is padding, not the model's choice."""
    for k, t in enumerate(ids):
        if t in eos_ids:
            return ids[:k + 1]
    return ids


def _adds_bos(tokenizer, texts: list[str]) -> bool:
    """Whether tokenizing should add special tokens: not when the chat template already wrote the BOS."""
    return not (tokenizer.bos_token and all(t.startswith(tokenizer.bos_token) for t in texts))


def _encode_prompts(tokenizer, texts: list[str], device):
    """Left-padded ids and mask; no second BOS when the chat template already wrote one."""
    add_special = _adds_bos(tokenizer, texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special).to(device)
    finally:
        tokenizer.padding_side = side


def _cache_kwarg(model) -> str:
    # transformers renamed the forward argument `past_key_values` to `cache` during 5.x (the old name warns);
    # pass whichever this version's forward takes. Drop when dpokit requires a transformers that has `cache`.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps forward in **kwargs
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _eos_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


@torch.no_grad()
def sample(model, tokenizer, prompts: list, *, num_samples: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
           system_prompt: str | None = None, progress=None, engine: str = "fast") -> list[list[Sample]]:
    """`num_samples` answers per prompt (temperature 0 = greedy). `batch_size` counts sequences per batch."""
    if engine not in ENGINES:
        raise ValueError(f"unknown sampling engine {engine!r}; use one of {', '.join(ENGINES)}")
    texts = [prompt_text(p, tokenizer, system_prompt) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        run = _sample_fast if engine == "fast" else _sample_hf
        return run(model, tokenizer, texts, num_samples, max_new_tokens, temperature, top_p, seed, batch_size,
                   progress)
    finally:
        model.train(was_training)


def _sample_hf(model, tokenizer, texts, num_samples, max_new_tokens, temperature, top_p, seed, batch_size,
               progress) -> list[list[Sample]]:
    device = next(model.parameters()).device
    eos_ids = _eos_ids(tokenizer)
    outputs: list[list[Sample]] = [[] for _ in texts]
    jobs = [(i, s) for i in range(len(texts)) for s in range(num_samples)]
    for b, start in enumerate(range(0, len(jobs), batch_size)):
        chunk = jobs[start:start + batch_size]
        enc = _encode_prompts(tokenizer, [texts[i] for i, _ in chunk], device)
        torch.manual_seed(seed * 100003 + b)
        sampling = temperature > 0
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=sampling,
            temperature=temperature if sampling else None, top_p=top_p if sampling else None,
            top_k=0 if sampling else None,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        width = enc["input_ids"].shape[1]
        for row, (i, _) in enumerate(chunk):
            prompt_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
            response_ids = _trim(out[row, width:].tolist(), eos_ids)
            text = tokenizer.decode(response_ids, skip_special_tokens=True).strip()
            outputs[i].append(Sample(prompt_ids, response_ids, text))
        if progress is not None:
            progress(len(chunk))
    return outputs


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor | None):
    """(next token ids, their log-probs under the model) from fp32 logits [B, V] and one uniform draw per row [B].

    Sampling inverts the CDF: the first token whose cumulative probability exceeds u draws token i with probability
    p_i. It needs one random number per row instead of one per vocabulary entry (an exponential race or Gumbel
    noise over 49k entries cost 3x the time of this whole function on the 2-core CPU), and one pass each for exp
    and the cumulative sum, the latter in float64 so that rare tokens keep their probability. top_p < 1 sorts
    first and inverts the truncated, renormalised CDF. The returned log-prob is log softmax(logits) at the chosen
    id: the model's own distribution, whatever temperature/top_p sampled it."""
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    else:
        peak = logits.amax(dim=-1, keepdim=True)
        # One exp pass serves both the sampling weights and, at temperature 1, the log-normaliser.
        weights = torch.exp(logits - peak) if temperature == 1.0 else torch.exp((logits - peak) / temperature)
        lse = (peak + weights.sum(dim=-1, keepdim=True).log() if temperature == 1.0
               else torch.logsumexp(logits, dim=-1, keepdim=True))
        order = None
        if top_p < 1.0:
            probs, order = (weights / weights.sum(dim=-1, keepdim=True)).sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            weights = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
        cdf = weights.double().cumsum_(dim=-1)
        # right=True: the first index with cdf > u * total, so a zero-probability token is never drawn
        index = torch.searchsorted(cdf, uniform.double()[:, None] * cdf[:, -1:], right=True)
        index = index.clamp_(max=logits.shape[-1] - 1)
        tokens = (order.gather(-1, index) if order is not None else index)[:, 0]
    return tokens, (logits.gather(-1, tokens[:, None]) - lse)[:, 0]


class _ReservedLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in a buffer with room for the tokens still to come.

    transformers' DynamicLayer concatenates the whole cache with each new token (torch.cat per layer and step: 7% of
    a batch-64 decode step of SmolLM2-135M on the 2-core CPU); this one writes the token into its buffer and hands
    attention a view of the filled part."""

    def __init__(self, layer: DynamicLayer, room: int):
        super().__init__()
        batch, heads, length, dim = layer.keys.shape
        self.key_buffer = layer.keys.new_empty(batch, heads, length + room, dim)
        self.value_buffer = layer.values.new_empty(batch, heads, length + room, layer.values.shape[-1])
        self.key_buffer[:, :, :length] = layer.keys
        self.value_buffer[:, :, :length] = layer.values
        self.length, self.device, self.is_initialized = length, layer.keys.device, True
        self._view()

    def _view(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        self.key_buffer[:, :, self.length:self.length + new] = key_states
        self.value_buffer[:, :, self.length:self.length + new] = value_states
        self.length += new
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._view()


def _reserve(cache: DynamicCache, room: int) -> None:
    """Swap plain dynamic layers for reserved ones (sliding-window and other layer kinds keep their own)."""
    cache.layers = [_ReservedLayer(layer, room) if type(layer) is DynamicLayer and layer.is_initialized else layer
                    for layer in cache.layers]


# Prompts that share at least this many leading tokens (a chat template's system prompt and role header) are
# prefilled in two parts: the shared tokens once for the batch, then each prompt's own tokens. Below it, the
# extra forward costs more than it saves.
MIN_SHARED_PREFIX = 8


def _prefill(model, tokenizer, texts: list[str], cache: DynamicCache, cache_arg: str, device):
    """Prefill `cache` with the prompts; returns (logits of each prompt's last token, unpadded prompt ids, 2-D
    attention mask, position of each prompt's last token).

    The token sequence the model sees is exactly each prompt's own: when the prompts share a prefix, the cache
    holds [shared prefix | left padding | rest of the prompt] per row, the padding masked out and positions counted
    over real tokens only, so the logits equal an unshared prefill's up to floating-point summation order."""
    ids = tokenizer(texts, add_special_tokens=_adds_bos(tokenizer, texts))["input_ids"]
    shared = 0
    # Padding between the shared prefix and the rest is a mask with holes: eager and sdpa take any 4-D mask; other
    # kernels (flash, flex) are left to the plain left-padded prefill.
    if len(ids) > 1 and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager", "dpokit"):
        shortest = min(len(x) for x in ids) - 1  # every prompt keeps at least one token of its own
        while shared < shortest and all(x[shared] == ids[0][shared] for x in ids):
            shared += 1
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    rest = [x[shared:] for x in ids]
    width = max(len(x) for x in rest)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in rest], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rest], device=device)
    if shared:
        model(input_ids=torch.tensor([ids[0][:shared]], device=device), use_cache=True, logits_to_keep=1,
              **{cache_arg: cache})
        cache.batch_repeat_interleave(len(ids))
        mask = torch.cat([mask.new_ones(len(ids), shared), mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_arg: cache})
    return out.logits[:, -1].float(), ids, mask, positions[:, -1:]


def _sample_fast(model, tokenizer, texts, num_samples, max_new_tokens, temperature, top_p, seed, batch_size,
                 progress) -> list[list[Sample]]:
    device = next(model.parameters()).device
    cache_arg = _cache_kwarg(model)
    eos = torch.tensor(sorted(_eos_ids(tokenizer)) or [-1], device=device)
    per_batch = max(1, batch_size // num_samples)  # prompts per batch: their samples fill about batch_size rows
    outputs: list[list[Sample]] = [[] for _ in texts]
    for b, start in enumerate(range(0, len(texts), per_batch)):
        chunk = list(range(start, min(start + per_batch, len(texts))))
        cache = DynamicCache(config=model.config)  # filled in place by every forward
        logits, prompt_ids, mask, position = _prefill(model, tokenizer, [texts[i] for i in chunk], cache, cache_arg,
                                                      device)
        # Fork: one prefill per prompt, its cache repeated for its samples (rows i*n .. i*n+n-1 are prompt i's).
        cache.batch_repeat_interleave(num_samples)
        _reserve(cache, max_new_tokens)
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        position = position.repeat_interleave(num_samples, dim=0) + 1
        rows = logits.shape[0]
        alive = torch.arange(rows, device=device)  # original row of each live row
        tokens = torch.full((rows, max_new_tokens), -1, dtype=torch.long, device=device)
        logps = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
        generator = torch.Generator(device=device).manual_seed(seed * 100003 + b)
        for step in range(max_new_tokens):
            uniform = None
            if temperature > 0:  # a draw for every row of the batch, so a row's draws never depend on the others
                uniform = torch.rand(rows, device=device, generator=generator)[alive]
            token, token_logp = pick_tokens(logits, temperature, top_p, uniform)
            tokens[alive, step] = token
            logps[alive, step] = token_logp
            keep = ~torch.isin(token, eos)
            if step == max_new_tokens - 1 or not bool(keep.any()):
                break
            if not bool(keep.all()):  # finished rows leave the batch: the next forward is smaller
                index = keep.nonzero()[:, 0]
                cache.batch_select_indices(index)
                alive, token, mask, position = alive[index], token[index], mask[index], position[index]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                        **{cache_arg: cache})
            logits = out.logits[:, -1].float()
            position = position + 1
        tokens_list, logps_list = tokens.tolist(), logps.tolist()
        for k, i in enumerate(chunk):
            for s in range(num_samples):
                row = k * num_samples + s
                n = next((j for j, t in enumerate(tokens_list[row]) if t < 0), max_new_tokens)
                response_ids = tokens_list[row][:n]
                text = tokenizer.decode(response_ids, skip_special_tokens=True).strip()
                outputs[i].append(Sample(prompt_ids[k], response_ids, text, logps_list[row][:n]))
        if progress is not None:
            progress(len(chunk) * num_samples)
    return outputs


__all__ = ["ENGINES", "Sample", "generate", "is_conversational", "pick_tokens", "prompt_text", "sample"]
