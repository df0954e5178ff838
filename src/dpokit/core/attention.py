"""Attention backends for packed pairs (`train.attention`): dense, flex and varlen. Chosen in
`dpokit.train.packing.choose_collator`; docs/gpu-engine.md explains them and how `auto` picks.

Every backend computes the same attention as `pack_pairs`' dense 4-D mask: within a row, a token of pair i sees
pair i's prompt and its own response up to itself, never another response or another pair.

- dense: the (R, 1, W, W) bool mask, passed to sdpa/eager as is. Works everywhere; keeps sdpa off its flash
  kernels and costs W^2 memory per row.
- flex: a `BlockMask` from document ids (which pair) and segment ids (0 = prompt, k + 1 = response k), passed to
  transformers' `flex_attention` explicitly (without it transformers would infer document boundaries from
  position_ids, and the rejected part, whose positions restart at the prompt's length, would lose its prompt).
  Row widths are bucketed to multiples of 128 so the compiled kernel sees few shapes.
- varlen: PyTorch's variable-length FlashAttention (`torch.nn.attention.varlen.varlen_attn`, CUDA only), with the
  batch as one flattened row. Each pair is two query segments, [prompt, chosen] and [rejected], and two key
  segments, [prompt, chosen] and [prompt, rejected], gathered by a key/value index; FlashAttention aligns its causal
  mask bottom-right, so rejected query t sees the prompt and rejected tokens up to t.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

BACKENDS = ("varlen", "flex", "dense")
VARLEN = "dpokit_varlen"  # the transformers AttentionInterface name of the varlen backend
FLEX_BUCKET = 128


# ------------------------------------------------------------------------------------------------------------- flex
def flex_mask_mod(document_ids: torch.Tensor, segment_ids: torch.Tensor):
    """mask_mod(b, h, q, kv) equal to pack_pairs' dense mask: every position sees itself (padding included); a
    token sees the earlier tokens of its own pair that are prompt or its own response."""
    def mask_mod(b, h, q, kv):
        doc_q, seg_q, seg_kv = document_ids[b, q], segment_ids[b, q], segment_ids[b, kv]
        same_pair = (doc_q == document_ids[b, kv]) & (doc_q >= 0)
        return (q == kv) | (same_pair & (kv <= q) & ((seg_kv == 0) | (seg_kv == seg_q)))
    return mask_mod


def flex_block_mask(document_ids: torch.Tensor, segment_ids: torch.Tensor):
    """The BlockMask of a packed batch (R rows of width W) for transformers' flex_attention."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = document_ids.shape
    return create_block_mask(flex_mask_mod(document_ids, segment_ids), B=rows, H=None, Q_LEN=width, KV_LEN=width,
                             device=document_ids.device)


# ----------------------------------------------------------------------------------------------------------- varlen
def varlen_layout(groups_at: list[tuple[int, int, list[int]]], total: int) -> dict:
    """Query segments and the key/value index of one flattened row. `groups_at`: (start, prompt length, response
    lengths) per group laid out as [prompt, r1, ..., rN] from `start`; positions from `total` on are padding.

    Query segments are contiguous row ranges: [prompt, r1], then each later response alone (and the padding tail,
    which sees itself causally). Key segment s is [prompt, r1] for the first and [prompt, rk] for response k, as row
    positions in `kv_index`. cu_seq_q / cu_seq_k are the segments' cumulative starts; max_q / max_k Python ints."""
    cu_q, cu_k, kv_index = [0], [0], []
    for start, lp, lengths in groups_at:
        at = start + lp
        for k, n in enumerate(lengths):
            if k == 0:
                q_len, keys = lp + n, range(start, at + n)
            else:
                q_len, keys = n, [*range(start, start + lp), *range(at, at + n)]
            if q_len == 0:
                continue
            kv_index.extend(keys)
            cu_q.append(cu_q[-1] + q_len)
            cu_k.append(len(kv_index))
            at += n
    end = cu_q[-1]
    if end < total:  # padding tail: its own causal segment
        kv_index.extend(range(end, total))
        cu_q.append(total)
        cu_k.append(len(kv_index))
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
    k_lens = [b - a for a, b in zip(cu_k, cu_k[1:])]
    return {"kv_index": torch.tensor(kv_index, dtype=torch.long), "cu_seq_q": torch.tensor(cu_q, dtype=torch.int32),
            "cu_seq_k": torch.tensor(cu_k, dtype=torch.int32), "max_q": max(q_lens), "max_k": max(k_lens),
            "cu_q_list": cu_q, "cu_k_list": cu_k}


def varlen_reference(q, k, v, cu_q: list[int], cu_k: list[int], scale: float | None = None) -> torch.Tensor:
    """varlen_attn's result from plain softmax, one segment at a time: q (Tq, Hq, D), k/v (Tk, Hkv, D); causal
    aligned bottom-right (query t of a segment of Lq queries and Lk keys sees keys up to t + Lk - Lq)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1).float()  # (H, Lq, D)
        ks = k[cu_k[s]:cu_k[s + 1]].repeat_interleave(groups, 1).transpose(0, 1).float()
        vs = v[cu_k[s]:cu_k[s + 1]].repeat_interleave(groups, 1).transpose(0, 1).float()
        lq, lk = qs.shape[1], ks.shape[1]
        scores = qs @ ks.transpose(1, 2) * scale
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        out[cu_q[s]:cu_q[s + 1]] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


def _varlen_kernel(q, k, v, layout: dict, scale):
    """torch.nn.attention.varlen.varlen_attn across its signatures: causal is `is_causal=True` (torch 2.10) or
    `window_size=(-1, 0)` (later); GQA is `enable_gqa` where it exists, else the K/V heads are repeated."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {"scale": scale}
    kwargs.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    return varlen_attn(q, k, v, layout["cu_seq_q"], layout["cu_seq_k"], layout["max_q"], layout["max_k"], **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers AttentionInterface function: query (1, Hq, T, D), key/value (1, Hkv, T, D) of one flattened
    row; the layout comes as the `dpokit_varlen` keyword the packed forward passes. Returns (1, T, Hq, D)."""
    layout = kwargs.get("dpokit_varlen")
    if layout is None:
        raise ValueError("dpokit_varlen attention needs the packed batch's varlen layout (a dpokit packed forward)")
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1).index_select(0, layout["kv_index"])
    v = value[0].transpose(0, 1).index_select(0, layout["kv_index"])
    if q.is_cuda:
        out = _varlen_kernel(q, k, v, layout, scaling)
    else:  # the same attention without the CUDA kernel (CPU tests of the layout and of the model wiring)
        out = varlen_reference(q, k, v, layout["cu_q_list"], layout["cu_k_list"], scaling)
    return out.unsqueeze(0), None


def register_varlen(force: bool = False) -> bool:
    """Register the varlen backend as a transformers AttentionInterface (where CUDA is available, or `force`:
    the CPU tests). True when registered."""
    if not (force or torch.cuda.is_available()):
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return True


def varlen_unavailable() -> str | None:
    """Why varlen cannot run here, or None."""
    if not torch.cuda.is_available():
        return "varlen needs CUDA (FlashAttention kernels)"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
    return None


def flex_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "flex needs CUDA here (on a CPU it compiles slowly and runs slower than dense)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no flex_attention"
    return None


@contextlib.contextmanager
def attention_implementation(model, name: str | None):
    """Run the model's forward with another attention implementation (the packed forward only; every other forward
    keeps the model's own). None: unchanged."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if name is None or config is None:
        yield
        return
    before = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = before
