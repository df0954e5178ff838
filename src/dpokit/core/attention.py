"""Attention backends for packed pairs (`train.layout`): dense, flex and varlen. Chosen in
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

flex and varlen run through one attention function, `dpokit_attention_forward`, registered with transformers as
`DPOKIT` for good and routed on the layout's own arguments (sdpa otherwise), so gradient checkpointing's
recomputation in backward takes the forward's path (`layout_attention`).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os

import torch

from dpokit.core.wrapped import transformers_model

VARLEN = "dpokit_varlen"  # the keyword that carries the varlen layout (and its stand-alone AttentionInterface name)
DPOKIT = "dpokit"  # the AttentionInterface name of dpokit_attention_forward: varlen, flex or sdpa by the arguments
EMULATE_ENV = "DPOKIT_EMULATE_KERNELS"  # test-only: "1" lets a CPU stand in for the varlen and flex kernels
_VARLEN_FORWARD = contextvars.ContextVar("dpokit_varlen_forward", default=False)  # no mask built (dpokit_mask)
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


def _autocast_qkv(query, key, value):
    """q, k, v in one dtype: autocast's when it is on (LLaMA/Qwen2 rotary embeddings leave q and k in fp32 while v
    is bf16, and neither FlashAttention nor flex has an autocast rule), else unchanged. transformers' own flash
    integration casts the same way."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers AttentionInterface function: query (1, Hq, T, D), key/value (1, Hkv, T, D) of one flattened
    row; the layout comes as the `dpokit_varlen` keyword the packed forward passes. Returns (1, T, Hq, D)."""
    layout = kwargs.get("dpokit_varlen")
    if layout is None:
        raise ValueError("dpokit_varlen attention needs the packed batch's varlen layout (a dpokit packed forward)")
    query, key, value = _autocast_qkv(query, key, value)
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1).index_select(0, layout["kv_index"])
    v = value[0].transpose(0, 1).index_select(0, layout["kv_index"])
    if q.is_cuda:
        out = _varlen_kernel(q, k, v, layout, scaling)
    else:  # the same attention without the CUDA kernel (CPU tests of the layout and of the model wiring)
        out = varlen_reference(q, k, v, layout["cu_q_list"], layout["cu_k_list"], scaling)
    return out.unsqueeze(0), None


def flex_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' flex_attention with the packed batch's BlockMask, q/k/v in autocast's dtype."""
    query, key, value = _autocast_qkv(query, key, value)
    return _flex_kernel(module, query, key, value, attention_mask, **kwargs)


def _flex_kernel(module, query, key, value, block_mask, **kwargs):
    """transformers' flex_attention_forward; on a CPU under the test-only emulation (`emulating`) the BlockMask
    expanded to a dense bool mask for sdpa instead (CPU flex has no backward and compiles for minutes)."""
    from transformers.integrations.flex_attention import flex_attention_forward as hf_flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and emulating():
        from torch.nn.attention.flex_attention import create_mask

        rows, _, q_len, kv_len = block_mask.shape
        dense = create_mask(block_mask.mask_mod, rows, None, q_len, kv_len, device=query.device)
        return sdpa_attention_forward(module, query, key, value, dense, **kwargs)
    return hf_flex_attention_forward(module, query, key, value, block_mask, **kwargs)


def dpokit_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The attention function every packed-capable model runs (`DPOKIT`), registered once and left in place: it
    routes on the packed layout's own arguments, so a recomputation in backward (gradient checkpointing, where
    nothing switched per forward is in effect any more) takes the forward's path. A varlen layout
    (`dpokit_varlen` keyword): varlen; a BlockMask: flex; anything else: transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("dpokit_varlen") is not None:
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if _is_block_mask(attention_mask):
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _is_block_mask(mask) -> bool:
    return type(mask).__name__ == "BlockMask"


def dpokit_mask(*args, **kwargs):
    """The mask function of `DPOKIT`: sdpa's, except in a varlen forward, whose attention needs no mask (sdpa's
    would be a (T, T) mask of the flattened row, built and ignored)."""
    from transformers.masking_utils import sdpa_mask

    if _VARLEN_FORWARD.get():
        return None
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register `DPOKIT` (and its mask function) with transformers; idempotent. Registered for good: a model whose
    config names it must find it in every later forward and recomputation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(DPOKIT, dpokit_attention_forward)
    AttentionMaskInterface.register(DPOKIT, dpokit_mask)


def emulating() -> bool:
    """Test-only: the CPU stands in for the CUDA kernels (varlen: plain softmax per segment; flex: the BlockMask
    expanded for sdpa), so varlen and flex can be chosen and trained through on a CPU. Set by EMULATE_ENV=1."""
    return os.environ.get(EMULATE_ENV) == "1"


def varlen_unavailable() -> str | None:
    """Why varlen cannot run here, or None."""
    if emulating():
        return None
    if not torch.cuda.is_available():
        return "varlen needs CUDA (FlashAttention kernels)"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
    return None


def flex_unavailable() -> str | None:
    if emulating():
        return None
    if not torch.cuda.is_available():
        return "flex needs CUDA here (on a CPU it compiles slowly and runs slower than dense)"
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no flex_attention"
    return None


@contextlib.contextmanager
def layout_attention(model, layout: str | None):
    """The packed forward of a `layout` that needs dpokit's attention function ("varlen", "flex"; None: dense and
    padded, nothing to do). The model's `PretrainedConfig` is found behind its wrappers (DDP, DeepSpeed, PEFT). A
    model whose own implementation is sdpa is switched to `DPOKIT` for good: that does what sdpa does in every
    other forward, and gradient checkpointing's recomputation in backward finds it. Another implementation
    (eager) is switched for this forward only, which gradient checkpointing cannot recompute: refused."""
    if layout is None:
        yield
        return
    inner = _layout_model(model, layout)
    config = inner.config
    register_attention()
    if config._attn_implementation == "sdpa":
        config._attn_implementation_internal = DPOKIT
    before = config._attn_implementation
    if before != DPOKIT and inner.training and getattr(inner, "is_gradient_checkpointing", False):
        raise ValueError(f"the {layout} layout with gradient checkpointing needs model.attn_implementation sdpa "
                         f"(this model's is {before}: the recomputation in backward would not see the layout)")
    token = _VARLEN_FORWARD.set(layout == "varlen")
    config._attn_implementation_internal = DPOKIT
    try:
        yield
    finally:
        config._attn_implementation_internal = before
        _VARLEN_FORWARD.reset(token)


def _layout_model(model, layout: str):
    inner = transformers_model(model)
    if inner is None:
        raise ValueError(f"the {layout} layout needs the model's transformers PretrainedConfig; none found behind "
                         f"{type(model).__name__}")
    return inner
