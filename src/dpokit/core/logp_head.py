"""Chunked log-prob head: log p(target) of the scored tokens without a [scored tokens x vocab] logits tensor.

The packed path scores only response tokens: their hidden states are gathered, and the LM head, log-softmax and
target gather run `chunk` tokens at a time (fp32 log-softmax whatever the compute dtype). A custom autograd function
keeps only the hidden states and one logsumexp per token for backward and recomputes each chunk's logits there, so
neither pass holds more than one [chunk x vocab] block (small batches, under KEEP_LOGITS_MAX elements, keep the
chunks' logits instead of recomputing them) (about 2 x chunk x vocab x 4 bytes: 0.6 GB at chunk 1024 and
Qwen2's 151936-token vocabulary, against 9 GB for 16k scored tokens at once).

`head_plan(model)` says whether a model's logits are a plain (optionally soft-capped) linear map of its decoder's
last hidden state, and gives the reason when not; those models keep the full-logits forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpokit.core.wrapped import transformers_model

# Architectures whose logits are `lm_head(decoder(...).last_hidden_state)`, optionally soft-capped
# (`final_logit_softcapping`): for them the head runs on the scored positions only, in chunks.
PLAIN_HEAD_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gpt2", "phi3", "olmo", "olmo2", "gemma2"}
DEFAULT_CHUNK = 1024
# Below this many scored-token x vocab elements (256 MB of fp32 logits) the chunks' logits are kept for backward
# instead of recomputed: the recompute costs one more LM-head matmul (about 4% of a CPU step on the 16M LLaMA), and
# memory is no concern there. Above it (GPU batches) nothing [tokens x vocab] outlives its chunk.
KEEP_LOGITS_MAX = 2**26


@dataclass
class HeadPlan:
    decoder: torch.nn.Module  # returns last_hidden_state
    head: torch.nn.Linear
    softcap: float | None = None


def head_plan(model) -> HeadPlan | str:
    """How to score `model` with the chunked head, or the reason it needs the full-logits forward. `model` may be
    wrapped (DDP, DeepSpeed's engine, PEFT): the plan's modules are the transformers model's behind the wrappers,
    while the forward still goes through them (`dpokit.core.packing`)."""
    inner = transformers_model(model)
    if inner is None:
        return f"no transformers PretrainedConfig found behind {type(model).__name__}"
    config = inner.config
    model_type = getattr(config, "model_type", None)
    if model_type not in PLAIN_HEAD_TYPES:
        return f"model type {model_type!r} is not one whose logits are a plain linear head"
    if getattr(config, "logit_scale", None):
        return "logit_scale is set"
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):  # e.g. a LoRA-wrapped lm_head
        return f"the output layer is a {type(head).__name__}, not a torch.nn.Linear"
    if tuple(head.weight.shape) != (head.out_features, head.in_features) or type(head.weight).__name__ == "DTensor":
        return "the output layer's weight is sharded (FSDP / ZeRO-3)"
    decoder = getattr(inner, "base_model", None)  # LLaMA-style `model`, GPT-2's `transformer`
    if decoder is None or decoder is inner:
        return "no separate decoder module"
    return HeadPlan(decoder, head, getattr(config, "final_logit_softcapping", None) or None)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on (Trainer's bf16), else the weights'."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _chunk_logits(h, weight, bias, softcap):
    logits = torch.nn.functional.linear(h, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class _ChunkedLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, softcap, keep_logits_max):
        dtype = _compute_dtype(hidden, weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        keep = hidden.shape[0] * weight.shape[0] <= keep_logits_max
        if keep:  # small enough to keep whole: one chunk, the full-logits path's cost
            chunk = max(hidden.shape[0], 1)
        ctx.kept = []
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                logits = _chunk_logits(h[s:s + chunk], w, b, softcap)
                lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
                out[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
                if keep:
                    ctx.kept.append(logits)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.softcap, ctx.dtype = chunk, softcap, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, chunk, softcap = ctx.dtype, ctx.chunk, ctx.softcap
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for i, s in enumerate(range(0, hidden.shape[0], chunk)):
                logits = ctx.kept[i] if ctx.kept else _chunk_logits(h[s:s + chunk], w, b, softcap)
                g = grad_out[s:s + chunk].float()
                # d log p(y) / d logits = onehot(y) - softmax, scaled by the incoming gradient of each token
                grad_logits = torch.exp(logits - lse[s:s + chunk, None]).mul_(-g[:, None])
                grad_logits.scatter_add_(-1, targets[s:s + chunk, None], g[:, None])
                if softcap:  # d (c tanh(z / c)) / dz = 1 - tanh^2 = 1 - (logits / c)^2
                    grad_logits.mul_(1 - (logits / softcap) ** 2)
                grad_logits = grad_logits.to(dtype)
                if need_h:
                    grad_h[s:s + chunk] = (grad_logits @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (grad_logits.t() @ h[s:s + chunk]).float()
                if need_b:
                    grad_b += grad_logits.float().sum(0)
        ctx.kept = []
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_token_logps(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                        chunk: int = DEFAULT_CHUNK, softcap: float | None = None,
                        keep_logits_max: int = KEEP_LOGITS_MAX) -> torch.Tensor:
    """log p(targets[i]) under `head(hidden[i])` (soft-capped when `softcap`), fp32, for hidden (N, H). Logits
    are recomputed in backward when N x vocab exceeds `keep_logits_max`, else kept from the forward."""
    return _ChunkedLogps.apply(hidden, head.weight, head.bias, targets, chunk, softcap, keep_logits_max)
