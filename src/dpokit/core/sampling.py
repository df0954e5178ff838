"""Batched sampling with left padding, seeded so base and tuned models see the same randomness."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpokit.core.templates import is_conversational


def prompt_text(prompt, tokenizer, system_prompt: str | None = None) -> str:
    """A canonical prompt (string or messages) as the text the model continues."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, num_samples: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
             system_prompt: str | None = None, progress=None) -> list[list[str]]:
    """`num_samples` completions per prompt (decoded, special tokens stripped). temperature 0 = greedy.

    Each batch reseeds torch from (seed, batch index), so two models sampled with the same arguments draw the same
    random numbers batch by batch.
    """
    samples = sample(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                     system_prompt=system_prompt, progress=progress)
    return [[s.text for s in per_prompt] for per_prompt in samples]


@dataclass
class Sample:
    """One generated answer: the unpadded prompt ids, the generated ids (up to and including the first EOS), and
    the decoded text."""

    prompt_ids: list[int]
    response_ids: list[int]
    text: str


def _trim(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first EOS: what follows is padding, not the model's choice."""
    for k, t in enumerate(ids):
        if t in eos_ids:
            return ids[:k + 1]
    return ids


@torch.no_grad()
def sample(model, tokenizer, prompts: list, *, num_samples: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
           system_prompt: str | None = None, progress=None) -> list[list[Sample]]:
    """Like `generate`, keeping token ids (for log-prob scoring of the samples, e.g. KL)."""
    texts = [prompt_text(p, tokenizer, system_prompt) for p in prompts]
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    outputs: list[list[Sample]] = [[] for _ in texts]
    jobs = [(i, s) for i in range(len(texts)) for s in range(num_samples)]
    try:
        for b, start in enumerate(range(0, len(jobs), batch_size)):
            chunk = jobs[start:start + batch_size]
            batch_texts = [texts[i] for i, _ in chunk]
            add_special = not (tokenizer.bos_token and all(t.startswith(tokenizer.bos_token) for t in batch_texts))
            enc = tokenizer(batch_texts, return_tensors="pt", padding=True, add_special_tokens=add_special).to(device)
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
    finally:
        tokenizer.padding_side = side
    return outputs


__all__ = ["Sample", "generate", "is_conversational", "prompt_text", "sample"]
