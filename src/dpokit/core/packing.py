"""Packed DPO batches: prefix sharing and padding-free rows.

One pair is laid out once as `[prompt, chosen, rejected]`. A 4-D attention mask lets the rejected tokens see the
prompt and themselves but never the chosen tokens, and `position_ids` restart the rejected part at the prompt's
length, so every token sees exactly what it would see in its own unpadded `prompt + response` sequence. Several
pairs share a row when they fit beside each other (block-diagonal mask), rows are as wide as the widest pair of the
batch, and only response positions go through the LM head.

Scoring is explicit rather than "shift by one": each scored token records the row and position whose logits
predict it (for the first rejected token that is the last prompt token, not the last chosen one) and the output
slot it adds to (chosen of pair i = slot i, rejected of pair i = slot B + i), so the sums equal the padded path's.

Entry points: `PackedPairCollator`, `packed_sequence_logps`, `batch_logps` (dispatches packed/padded),
`packing_self_check`. Training's token-budget batches are `dpokit.train.packing`.
"""

from __future__ import annotations

import logging

import torch

from dpokit.core.attention import (
    DPOKIT,
    FLEX_BUCKET,
    VARLEN,
    flex_block_mask,
    layout_attention,
    varlen_layout,
)
from dpokit.core.batching import PairCollator, image_inputs, pad_pairs, sequence_logps, token_logps
from dpokit.core.logp_head import HeadPlan, chunked_token_logps, head_plan
from dpokit.core.wrapped import model_config

log = logging.getLogger(__name__)

def pair_length(pair: dict) -> int:
    """Tokens one pair (or ranked/unpaired row) occupies when prefix-shared: the prompt once plus every response."""
    if "responses_ids" in pair:
        return len(pair["prompt_ids"]) + sum(len(r) for r in pair["responses_ids"])
    return len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def probe_pair(row: dict) -> dict:
    """A pair from any encoded row (a ranked/unpaired row's first and last responses), for the packing self-check."""
    if "responses_ids" in row:
        return {"prompt_ids": row["prompt_ids"], "chosen_ids": row["responses_ids"][0],
                "rejected_ids": row["responses_ids"][-1]}
    return row


def _first_fit_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: pair indices per row, each row's total length <= width."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def pack_pairs(pairs: list[dict], pad_id: int, pad_to_multiple_of: int = 1,
               attention: str = "dense") -> dict[str, torch.Tensor]:
    """A packed batch of B pairs. Keys: input_ids, position_ids, document_ids, segment_ids (R, W); with attention
    "dense" attention_mask (R, 1, W, W) bool, True = may attend; with "varlen" one row and its `varlen` layout;
    score_row/score_pos/score_target/score_slot/score_index (N,) for the N scored tokens; num_pairs (int)."""
    n_pairs = len(pairs)
    groups = [(p["prompt_ids"], [p["chosen_ids"], p["rejected_ids"]]) for p in pairs]
    batch = pack_groups(groups, pad_id, pad_to_multiple_of, slot_of=lambda i, k: i + k * n_pairs,
                        attention=attention)
    batch["num_pairs"] = n_pairs  # a Python int: reading a count back from the GPU would stall the step
    if "ref_chosen_logps" in pairs[0]:
        batch["ref_chosen_logps"] = torch.tensor([p["ref_chosen_logps"] for p in pairs], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([p["ref_rejected_logps"] for p in pairs], dtype=torch.float32)
    return batch


def pack_groups(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, pad_to_multiple_of: int = 1,
                slot_of=None, attention: str = "dense") -> dict[str, torch.Tensor]:
    """Packed layout of B groups (prompt, [response_1, ..., response_N]), each laid out once as
    [prompt, r1, ..., rN]: every response attends to the prompt and to itself only, and its position_ids restart at
    the prompt's length. Response k of group i adds to output slot `slot_of(i, k)` (default: groups' responses
    numbered in order). document_ids (group index, -1 = padding) and segment_ids (0 = prompt, k + 1 = response k,
    -1 = padding) describe the layout; `attention` (dpokit.core.attention) says what else the forward needs: dense
    the 4-D bool mask, flex nothing more (rows bucketed to multiples of 128), varlen every group in one row and the
    key/value index."""
    if slot_of is None:
        offsets = [0]
        for _, responses in groups:
            offsets.append(offsets[-1] + len(responses))
        slot_of = lambda i, k: offsets[i] + k  # noqa: E731
    lengths = [len(p) + sum(len(r) for r in rs) for p, rs in groups]
    dense = attention == "dense"
    if attention == "flex":
        pad_to_multiple_of = max(pad_to_multiple_of, FLEX_BUCKET)
    width = max(sum(lengths) if attention == "varlen" else max(lengths), 1)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    rows = [list(range(len(groups)))] if attention == "varlen" else _first_fit_rows(lengths, width)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    document_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    groups_at = []  # (start, prompt length, response lengths) of each group in row order (varlen: one row)
    if dense:
        # Every position sees itself (padding included: a query with nothing to attend to gives NaN under sdpa).
        mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1, 1)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
    s_row, s_pos, s_tgt, s_slot, s_idx = [], [], [], [], []
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            prompt, responses = groups[i]
            lp = len(prompt)
            end = start + lengths[i]
            input_ids[r, start:end] = torch.tensor(prompt + [t for resp in responses for t in resp], dtype=torch.long)
            position_ids[r, start:start + lp] = torch.arange(lp)
            segment = [0] * lp  # 0 = prompt, k + 1 = response k
            at = lp
            for k, resp in enumerate(responses):
                position_ids[r, start + at:start + at + len(resp)] = torch.arange(lp, lp + len(resp))
                segment += [k + 1] * len(resp)
                # token t of response k is predicted by the token before it: the last prompt token for t = 0
                for t in range(len(resp)):
                    src = lp - 1 if t == 0 else at + t - 1
                    if src < 0:
                        continue
                    s_row.append(r), s_pos.append(start + src), s_tgt.append(resp[t]), s_slot.append(slot_of(i, k))
                    s_idx.append(t)
                at += len(resp)
            seg = torch.tensor(segment, dtype=torch.long)
            document_ids[r, start:end] = i
            segment_ids[r, start:end] = seg
            groups_at.append((start, lp, [len(resp) for resp in responses]))
            if dense:  # a response sees the prompt and itself, never another response
                block = causal[: end - start, : end - start] & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
                mask[r, 0, start:end, start:end] = block
            start = end
    batch = {
        "input_ids": input_ids, "position_ids": position_ids, "document_ids": document_ids, "segment_ids": segment_ids,
        "score_row": torch.tensor(s_row, dtype=torch.long), "score_pos": torch.tensor(s_pos, dtype=torch.long),
        "score_target": torch.tensor(s_tgt, dtype=torch.long), "score_slot": torch.tensor(s_slot, dtype=torch.long),
        "score_index": torch.tensor(s_idx, dtype=torch.long),  # the token's position in its response (LD-DPO)
    }
    if dense:
        batch["attention_mask"] = mask
    if attention == "varlen":
        batch["varlen"] = varlen_layout(groups_at, sum(lengths))
    return batch


def collate_lists(rows: list[dict], pad_id: int, packed: bool = True, pad_to_multiple_of: int = 1,
                  attention: str = "dense") -> dict:
    """A batch of ranked or unpaired rows (`prompt_ids`, `responses_ids`), their responses numbered in order
    (row 0's first, ..., then row 1's). packed: one prefix-shared segment per row; else one right-padded
    `prompt + response` row per response (the reference layout). Carries group_sizes (B,), scores (B, N) padded
    with -inf (ranked), labels (B,) bool (unpaired) and ref_logps (S,) when the rows hold precomputed ones."""
    groups = [(r["prompt_ids"], r["responses_ids"]) for r in rows]
    if packed:
        batch = pack_groups(groups, pad_id, pad_to_multiple_of, attention=attention)
    else:
        batch = pad_pairs([{"prompt_ids": p, "response_ids": resp} for p, rs in groups for resp in rs], pad_id,
                          keys=("response_ids",))
    sizes = [len(rs) for _, rs in groups]
    batch["group_sizes"] = torch.tensor(sizes, dtype=torch.long)
    batch["num_slots"], batch["max_group"] = sum(sizes), max(sizes)  # Python ints: no device reads in the step
    if "scores" in rows[0]:
        scores = torch.full((len(rows), max(sizes)), float("-inf"))
        for i, r in enumerate(rows):
            scores[i, : len(r["scores"])] = torch.tensor(r["scores"], dtype=torch.float32)
        batch["scores"] = scores
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([bool(r["label"]) for r in rows])
    if "ref_logps" in rows[0]:
        batch["ref_logps"] = torch.tensor([v for r in rows for v in r["ref_logps"]], dtype=torch.float32)
    return batch


class ListCollator:
    def __init__(self, pad_id: int, packed: bool = True, attention: str = "dense"):
        self.pad_id = pad_id
        self.packed = packed
        self.attention = attention

    def __call__(self, rows: list[dict]) -> dict:
        return collate_lists(rows, self.pad_id, self.packed, attention=self.attention)


def is_list_batch(batch: dict) -> bool:
    return "group_sizes" in batch


def list_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) of every response of a `collate_lists` batch, in response order."""
    n_slots = batch["num_slots"] if "num_slots" in batch else int(batch["group_sizes"].sum())
    if is_packed(batch):
        return packed_slot_logps(model, batch, n_slots)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    mask = batch["loss_mask"][:, 1:].to(torch.float32)
    per_token = token_logps(logits[:, :-1], batch["input_ids"][:, 1:]) * mask
    return per_token.sum(-1), mask.sum(-1)


def as_matrix(flat: torch.Tensor, sizes: torch.Tensor, fill: float = 0.0,
              n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response values (S,) -> (B, N) padded with `fill`, and the (B, N) bool mask of real entries
    (N = `n`, the batch's largest group, when the caller knows it; else read from `sizes`)."""
    n = int(sizes.max()) if n is None else n
    mask = torch.arange(n, device=sizes.device)[None, :] < sizes[:, None]
    out = torch.full(mask.shape, fill, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(mask, flat), mask


class PackedPairCollator:
    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, attention: str = "dense"):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.attention = attention

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        return pack_pairs(pairs, self.pad_id, self.pad_to_multiple_of, attention=self.attention)


def to_device(batch, device):
    """A batch (nested dicts of tensors and Python values) with every tensor on `device`."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def is_packed(batch: dict) -> bool:
    return "score_slot" in batch


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _attn_impl(model) -> str | None:
    return getattr(model_config(model), "_attn_implementation", None)


def _attention_inputs(model, batch: dict) -> tuple[dict, str | None]:
    """The packed forward's keyword arguments, and the layout that needs dpokit's attention function ("varlen",
    "flex"; None: the model's own attention with the dense mask)."""
    kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  **image_inputs(batch))  # a vision batch: each pair's images once (dpokit.core.vision)
    if "varlen" in batch:  # one flattened row; the layout reaches the attention function as a keyword
        return dict(kwargs, **{VARLEN: batch["varlen"]}), "varlen"
    if "attention_mask" not in batch:  # flex: a BlockMask, passed explicitly
        return dict(kwargs, attention_mask=flex_block_mask(batch["document_ids"], batch["segment_ids"])), "flex"
    allowed = batch["attention_mask"]
    if _attn_impl(model) in ("sdpa", DPOKIT):
        mask = allowed  # sdpa takes the bool mask as is, whatever the compute dtype (autocast included)
    else:  # eager adds the mask to the scores: additive float mask
        dtype = _model_dtype(model)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return dict(kwargs, attention_mask=mask), None


def decoder_hidden_states(model, plan: HeadPlan, kwargs: dict) -> torch.Tensor:
    """The decoder's last hidden states from a forward through `model` itself, wrappers included (DDP's gradient
    hooks, accelerate's autocast): a forward hook on the decoder keeps them, and `logits_to_keep` with no
    positions leaves the LM head nothing to compute (the chunked head scores the kept states)."""
    kept = []
    handle = plan.decoder.register_forward_hook(lambda module, args, out: kept.append(out.last_hidden_state))
    try:
        model(**kwargs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=kwargs["input_ids"].device))
    finally:
        handle.remove()
    return kept[-1]


def packed_slot_logps(model, batch: dict[str, torch.Tensor], n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) per output slot of a packed batch, with the attention backend its layout
    was built for (`pack_groups(attention=...)`)."""
    kwargs, layout = _attention_inputs(model, batch)
    plan = head_plan(model)
    rows, pos = batch["score_row"], batch["score_pos"]
    with layout_attention(model, layout):
        if isinstance(plan, HeadPlan):  # only the scored positions go through the LM head, in chunks
            hidden = decoder_hidden_states(model, plan, kwargs)
            per_token = chunked_token_logps(hidden[rows, pos], plan.head, batch["score_target"], softcap=plan.softcap)
        else:
            per_token = token_logps(model(**kwargs).logits[rows, pos], batch["score_target"])
    slot = batch["score_slot"]
    sums = slot_sums(per_token, slot, n_slots)
    counts = torch.zeros(n_slots, dtype=torch.float32, device=per_token.device).index_add(
        0, slot, torch.ones_like(per_token, dtype=torch.float32))
    return sums, counts


def slot_sums(values: torch.Tensor, slot: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Per-slot sums of per-token values, accumulated in fp64 and returned in the values' dtype: a fp32 sum of a
    few hundred log-probs of ~-1 is off by a few ulp of the total (1e-5 at -150), in an order that depends on the
    layout; summed in fp64, packed and padded batches give the exactly rounded sum whatever the layout (the
    gradient is the same ones either way)."""
    wide = values.dtype if values.device.type == "mps" else torch.float64  # MPS has no fp64
    acc = torch.zeros(n_slots, dtype=wide, device=values.device).index_add(0, slot, values.to(wide))
    return acc.to(values.dtype)


def packed_sequence_logps(model, batch: dict[str, torch.Tensor], ld_alpha: float | None = None,
                          wpo: bool = False) -> dict[str, torch.Tensor]:
    """Same output as `batching.sequence_logps` (chosen/rejected sums and token counts), from a packed batch.
    `ld_alpha` and `wpo`: see `pair_token_sums`."""
    n = int(batch["num_pairs"])
    if ld_alpha is None and not wpo:
        sums, counts = packed_slot_logps(model, batch, 2 * n)
        return {"chosen": sums[:n], "rejected": sums[n:], "chosen_tokens": counts[:n], "rejected_tokens": counts[n:],
                "chosen_nll_sum": -sums[:n]}
    per_token, sum_sq = packed_token_logps(model, batch, wpo)
    return pair_token_sums(per_token, batch["score_slot"], batch["score_index"], n, ld_alpha, sum_sq)


def packed_token_logps(model, batch: dict, wpo: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p of every scored token of a packed batch (N,), and with `wpo` log sum_v p(v)^2 at each (detached)."""
    kwargs, layout = _attention_inputs(model, batch)
    plan = head_plan(model)
    rows, pos, targets = batch["score_row"], batch["score_pos"], batch["score_target"]
    with layout_attention(model, layout):
        if isinstance(plan, HeadPlan):
            hidden = decoder_hidden_states(model, plan, kwargs)[rows, pos]
            per_token = chunked_token_logps(hidden, plan.head, targets, softcap=plan.softcap)
            sum_sq = chunked_log_sum_sq_probs(hidden, plan.head, softcap=plan.softcap) if wpo else None
        else:
            logits = model(**kwargs).logits[rows, pos]
            per_token = token_logps(logits, targets)
            sum_sq = log_sum_sq_probs(logits) if wpo else None
    return per_token, sum_sq


def pair_token_sums(per_token: torch.Tensor, slot: torch.Tensor, index: torch.Tensor, n: int,
                    ld_alpha: float | None = None, sum_sq: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-pair sums from per-token log-probs (N,) with their slots (chosen of pair i = i, rejected = n + i) and
    positions in the response. `ld_alpha` (LD-DPO, Liu et al. 2024, "Length Desensitization in Direct Preference
    Optimization", Eq. 7, as TRL): tokens past the shorter response's length of the pair count ld_alpha times.
    `sum_sq` (WPO, Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2, as TRL):
    adds `wpo_weights` (n,) = w_chosen * w_rejected, w = exp(mean over the response of log p(y_t) - log sum_v
    p(v)^2), detached, from the plain (not LD-weighted) log-probs."""
    ones = torch.ones_like(per_token, dtype=torch.float32)
    counts = torch.zeros(2 * n, dtype=torch.float32, device=per_token.device).index_add(0, slot, ones)
    weighted = per_token
    if ld_alpha is not None:
        shared = torch.minimum(counts[:n], counts[n:]).repeat(2)
        weighted = torch.where(index < shared[slot], per_token, per_token * ld_alpha)
    sums = slot_sums(weighted, slot, 2 * n)
    out = {"chosen": sums[:n], "rejected": sums[n:], "chosen_tokens": counts[:n], "rejected_tokens": counts[n:],
           "chosen_nll_sum": -slot_sums(per_token, slot, 2 * n)[:n]}
    if sum_sq is not None:
        with torch.no_grad():
            aligned = torch.zeros_like(counts).index_add(0, slot, (per_token.detach() - sum_sq).float())
            w = torch.exp(aligned / counts.clamp(min=1))
            out["wpo_weights"] = w[:n] * w[n:]
    return out


def padded_sequence_logps(model, batch: dict, ld_alpha: float | None = None, wpo: bool = False) -> dict:
    """`batching.sequence_logps` with LD-DPO / WPO (`pair_token_sums`) for a padded [chosen; rejected] batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    mask = batch["loss_mask"][:, 1:].bool()
    rows, cols = mask.nonzero(as_tuple=True)
    scored = logits[:, :-1][rows, cols]
    per_token = token_logps(scored, batch["input_ids"][:, 1:][rows, cols])
    index = (mask.long().cumsum(-1) - 1)[rows, cols]
    return pair_token_sums(per_token, rows, index, mask.shape[0] // 2, ld_alpha,
                           log_sum_sq_probs(scored) if wpo else None)


def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p(v)^2 per row of logits (fp32, detached): WPO's sampling-alignment term."""
    with torch.no_grad():
        return torch.logsumexp(2 * torch.log_softmax(logits.float(), dim=-1), dim=-1)


def chunked_log_sum_sq_probs(hidden: torch.Tensor, head, chunk: int = 1024, softcap: float | None = None):
    """`log_sum_sq_probs` of head(hidden) without a [tokens x vocab] tensor at once (detached)."""
    with torch.no_grad():
        parts = []
        for s in range(0, hidden.shape[0], chunk):
            logits = torch.nn.functional.linear(hidden[s:s + chunk], head.weight, head.bias)
            if softcap:
                logits = torch.tanh(logits.float() / softcap) * softcap
            parts.append(log_sum_sq_probs(logits))
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def batch_logps(model, batch: dict[str, torch.Tensor], ld_alpha: float | None = None,
                wpo: bool = False) -> dict[str, torch.Tensor]:
    """Sequence log-probs of a padded or a packed batch; `ld_alpha` / `wpo`: LD-DPO and WPO (`pair_token_sums`)."""
    if is_packed(batch):
        return packed_sequence_logps(model, batch, ld_alpha, wpo)
    if ld_alpha is None and not wpo:
        return sequence_logps(model, batch)
    return padded_sequence_logps(model, batch, ld_alpha, wpo)


def batch_num_pairs(batch: dict) -> int:
    """Items of a batch for loss normalisation: pairs, or rows of ranked/unpaired feedback."""
    if is_list_batch(batch):
        return int(batch["group_sizes"].shape[0])
    return int(batch["num_pairs"]) if is_packed(batch) else batch["input_ids"].shape[0] // 2


def packing_self_check(model, pair: dict, pad_id: int, attention: str = "dense",
                       autocast: torch.dtype | None = None) -> str | None:
    """Compare packed (with the `attention` backend) and padded log-probs of one pair on the loaded model, under the
    training's autocast dtype (bf16/fp16 mixed precision; FlashAttention has no fp32 kernel). None when they agree,
    else the reason."""
    probe = {k: pair[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            padded = sequence_logps(model, to_device(PairCollator(pad_id)([probe]), device))
            layout = pack_pairs([probe], pad_id) if attention == "dense" else pack_pairs([probe], pad_id,
                                                                                         attention=attention)
            packed = packed_sequence_logps(model, to_device(layout, device))
    except Exception as err:  # noqa: BLE001 - any failure means: use the padded path
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"packed forward failed ({type(err).__name__}: {first[:200]})"
    finally:
        model.train(was_training)
    # Per-token tolerance: fp32 kernels agree to ~1e-6; half precision differs in accumulation order.
    tol = 1e-4 if _model_dtype(model) == torch.float32 and autocast is None else 3e-2
    for name in ("chosen", "rejected"):
        tokens = max(float(padded[f"{name}_tokens"][0]), 1.0)
        diff = abs(float(padded[name][0]) - float(packed[name][0])) / tokens
        if not diff <= tol:
            return f"packed and padded {name} log-probs differ by {diff:.2e} per token (tolerance {tol:g})"
    return None
