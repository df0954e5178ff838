"""Canonical rows -> token ids: BOS/EOS hygiene, truncation and the template checks.

A pair is encoded as three id lists, `prompt_ids`, `chosen_ids`, `rejected_ids`; the model sees prompt + response.
Responses are tokenized apart from the prompt so the boundary is exact (no token merges across it), and so
the prompt can be shared by both responses (prefix sharing, packing).
"""

from __future__ import annotations

from dpokit.core.errors import UserError
from dpokit.core.run import LengthBias, OverMaxLength, TemplateChecks, Tokenization
from dpokit.core.templates import is_conversational, render, render_responses
from dpokit.data.checks import Tally


def _encode_prompt(text: str, tokenizer) -> list[int]:
    bos = tokenizer.bos_token
    # A chat template that already writes the BOS must not get a second one from the tokenizer.
    add_special = not (bos and text.startswith(bos))
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]  # an empty prompt still needs a first token to predict from
    return ids


def _encode_response(text: str, tokenizer, add_eos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return ids


def encode_pair(row: dict, tokenizer, *, system_prompt=None, max_length=512, max_prompt_length=None,
                truncation="prompt_left", where: str = "row", stats: dict | None = None) -> dict | None:
    """Token ids of one canonical row, truncated per `truncation`; None when the pair is dropped.

    `stats`, when given, receives the untruncated lengths (prompt, chosen, rejected) and whether the pair was over.
    """
    prompt_text, chosen_text, rejected_text = render(row, tokenizer, system_prompt)
    fitted = _encode_and_fit(prompt_text, [chosen_text, rejected_text], is_conversational(row), tokenizer,
                             max_length, max_prompt_length, truncation, where, stats)
    if stats is not None:
        lengths = stats.pop("responses")
        stats.update(chosen=lengths[0], rejected=lengths[1], texts=(prompt_text, chosen_text, rejected_text))
    if fitted is None:
        return None
    prompt, (chosen, rejected), truncated = fitted
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated}


def _encode_and_fit(prompt_text: str, response_texts: list[str], conversational: bool, tokenizer, max_length: int,
                    max_prompt_length: int | None, truncation: str, where: str, stats: dict | None):
    """(prompt ids, [response ids], truncated) with the longest prompt + response within max_length per
    `truncation`; None when dropped. `stats` receives the untruncated lengths and whether it was over."""
    prompt = _encode_prompt(prompt_text, tokenizer)
    # Plain-text responses get an EOS; chat templates close the turn themselves.
    responses = [_encode_response(text, tokenizer, add_eos=not conversational) for text in response_texts]
    longest = max(len(r) for r in responses)
    too_long = len(prompt) + longest > max_length or bool(max_prompt_length and len(prompt) > max_prompt_length)
    if stats is not None:
        stats.update(prompt=len(prompt), responses=[len(r) for r in responses], over=too_long)
    truncated = False
    if too_long:
        if truncation == "error":
            raise UserError(
                f"{where}: prompt + response is {len(prompt) + longest} tokens, over data.max_length={max_length}"
                f"{f' or data.max_prompt_length={max_prompt_length}' if max_prompt_length else ''}; "
                "raise max_length or set data.truncation to prompt_left or drop"
            )
        if truncation == "drop":
            return None
        truncated = True
        if max_prompt_length and len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
        budget = max(max_length - longest, min(len(prompt), max_length // 2))
        prompt = prompt[-budget:] if budget > 0 else prompt[-1:]
        room = max_length - len(prompt)
        responses = [r[:room] for r in responses]
    return prompt, responses, truncated


def encode_feedback(row: dict, tokenizer, *, system_prompt=None, max_length=512, max_prompt_length=None,
                    truncation="prompt_left", where: str = "row", stats: dict | None = None) -> dict | None:
    """Token ids of a ranked row ({prompt_ids, responses_ids, scores}, best first) or an unpaired row
    ({prompt_ids, responses_ids: [completion], label}; `attach_kl_completions` adds the mismatched completion)."""
    responses = row["responses"] if "responses" in row else [row["completion"]]
    prompt_text, texts = render_responses(row["prompt"], responses, tokenizer, system_prompt)
    fitted = _encode_and_fit(prompt_text, texts, is_conversational(row), tokenizer, max_length, max_prompt_length,
                             truncation, where, stats)
    if stats is not None:
        stats["texts"] = (prompt_text, *texts)
    if fitted is None:
        return None
    prompt, ids, truncated = fitted
    out = {"prompt_ids": prompt, "responses_ids": ids, "truncated": truncated}
    if "responses" in row:
        out["scores"] = list(row["scores"])
    else:
        out["label"] = bool(row["label"])
    return out


def attach_kl_completions(encoded: list[dict], max_length: int) -> None:
    """KTO's reference point needs, for each unpaired row, another row's completion under this row's prompt. As
    TRL does, the completions are shifted by one (row i gets the completion of row i-1, the first the last's),
    skipping rows with the same prompt (the two halves of a split pair), so the pairing is fixed before training and
    the reference log-probs of the mismatched completions can be precomputed and cached like the others."""
    n = len(encoded)
    for i, row in enumerate(encoded):
        j = next((k % n for k in range(i - 1, i - n, -1) if encoded[k % n]["prompt_ids"] != row["prompt_ids"]),
                 (i - 1) % n)
        room = max(max_length - len(row["prompt_ids"]), 1)
        row["responses_ids"] = row["responses_ids"][:1] + [encoded[j]["responses_ids"][0][:room]]


TEMPLATE_CHECK_ROWS = 8  # the "first batch": enough to catch a template bug, cheap on any dataset


def check_template(pair: dict, texts: tuple[str, str, str], tokenizer, where: str) -> bool:
    """Fail loudly on token hygiene problems in one encoded (untruncated) pair.

    - no double BOS at the start of the prompt;
    - exactly one EOS in each response, after its content (a template may add a newline after it);
    - tokenize(prompt + response) begins with tokenize(prompt); if it does not (tokens merge across the boundary),
      dpokit's separate tokenization must still give back the same text, else the model trains on other text.
    Returns True when the boundary merged tokens (handled by tokenizing the parts apart).
    """
    prompt = pair["prompt_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and bos != eos and prompt[:2] == [bos, bos]:
        raise UserError(f"{where}: the prompt starts with two BOS tokens (the chat template writes one and the "
                        "tokenizer adds another); fix data.chat_template or the tokenizer's add_bos_token")
    merged = False
    for name, text in (("chosen", texts[1]), ("rejected", texts[2])):
        ids = pair[f"{name}_ids"]
        if eos is not None:
            n_eos = ids.count(eos)
            tail = tokenizer.decode(ids[ids.index(eos) + 1:]) if n_eos == 1 else ""
            # Some chat templates close a turn with their own end-of-turn token rather than the EOS (Gemma's
            # <end_of_turn>, Llama 3's <|eot_id|> when eos is <|end_of_text|>): accept one special token closing it.
            closed_by_turn_token = n_eos == 0 and _ends_with_special(ids, tokenizer)
            if (n_eos != 1 or tail.strip()) and not closed_by_turn_token:
                raise UserError(
                    f"{where}: the {name} response has {n_eos} EOS token(s) "
                    f"{'not at its end ' if n_eos == 1 else ''}(expected exactly one, closing the response); "
                    "check data.chat_template: the template must end each assistant turn with the EOS once"
                )
        # Same special-token rule as _encode_prompt, so the only difference is the boundary.
        add_special = not (tokenizer.bos_token and texts[0].startswith(tokenizer.bos_token))
        full = tokenizer(texts[0] + text, add_special_tokens=add_special)["input_ids"]
        if full[: len(prompt)] != prompt:
            merged = True
            separate = tokenizer.decode(prompt + ids, skip_special_tokens=True)
            together = tokenizer.decode(full, skip_special_tokens=True)
            if separate.rstrip() != together.rstrip():
                raise UserError(
                    f"{where}: tokenizing the {name} response apart from the prompt changes the text "
                    f"({preview_text(together)!r} vs {preview_text(separate)!r}); use a template that ends the "
                    "prompt on a clean boundary (e.g. a newline)"
                )
    return merged


def _ends_with_special(ids: list[int], tokenizer) -> bool:
    """True when the last token that is not whitespace is a special (added, special=True) token."""
    special = set(tokenizer.all_special_ids) | {
        i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)}
    for token_id in reversed(ids):
        if token_id in special:
            return True
        if tokenizer.decode([token_id]).strip():
            return False
    return False


def preview_text(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def encode_rows(rows: list[dict], tokenizer, data_cfg, origin: str = "data",
                locations: list[str] | None = None, kept: list[int] | None = None) -> tuple[list[dict], dict]:
    """Encode every row; returns the encoded pairs and a report: lengths, truncation, template checks.

    Lengths are token counts of each response as the model sees it (after the template, EOS included, before
    truncation); `chosen_longer_fraction` is the share of pairs whose chosen response is strictly longer.
    `kept`, when given, receives the indices of the rows that were not dropped.
    """
    if rows and ("responses" in rows[0] or "completion" in rows[0]):
        return encode_feedback_rows(rows, tokenizer, data_cfg, origin, locations, kept)
    encoded, dropped, truncated, merged = [], 0, 0, 0
    over = Tally()
    chosen_len = rejected_len = chosen_longer = 0
    for index, row in enumerate(rows):
        where = locations[index] if locations else f"{origin} row {index + 1}"
        stats: dict = {}
        pair = encode_pair(row, tokenizer, system_prompt=data_cfg.system_prompt, max_length=data_cfg.max_length,
                           max_prompt_length=data_cfg.max_prompt_length, truncation=data_cfg.truncation,
                           where=where, stats=stats)
        chosen_len += stats["chosen"]
        rejected_len += stats["rejected"]
        chosen_longer += stats["chosen"] > stats["rejected"]
        if stats["over"]:
            over.add(where, tokens=f"prompt {stats['prompt']} + longest response "
                                   f"{max(stats['chosen'], stats['rejected'])}")
        if index < TEMPLATE_CHECK_ROWS and not stats["over"]:
            merged += check_template(pair, stats["texts"], tokenizer, where)
        if pair is None:
            dropped += 1
            continue
        truncated += pair.pop("truncated")
        encoded.append(pair)
        if kept is not None:
            kept.append(index)
    n = len(rows)
    action = {"prompt_left": "prompt cut from the left, then responses from the right if still too long",
              "drop": "pair dropped", "error": "stop with an error"}[data_cfg.truncation]
    return encoded, Tokenization(
        pairs=n, dropped_over_max_length=dropped, truncated=truncated,
        over_max_length=_over_max_length(over, data_cfg, action),
        length_bias=LengthBias(chosen_mean_tokens=round(chosen_len / n, 4) if n else None,
                               rejected_mean_tokens=round(rejected_len / n, 4) if n else None,
                               chosen_longer_fraction=round(chosen_longer / n, 4) if n else None),
        template_checks=_template_checks(n, merged))


def _over_max_length(over: Tally, data_cfg, action: str | None = None) -> OverMaxLength:
    return OverMaxLength(count=over.count, examples=over.examples, max_length=data_cfg.max_length,
                         max_prompt_length=data_cfg.max_prompt_length, truncation=data_cfg.truncation, action=action)


def _template_checks(n: int, merged: int) -> TemplateChecks:
    return TemplateChecks(rows_checked=min(n, TEMPLATE_CHECK_ROWS), double_bos=0, eos_per_response=1,
                          boundary_merges_handled=merged)


def encode_feedback_rows(rows: list[dict], tokenizer, data_cfg, origin: str = "data",
                         locations: list[str] | None = None, kept: list[int] | None = None) -> tuple[list[dict], dict]:
    """`encode_rows` for ranked and unpaired rows. Length bias: mean tokens by rank position (ranked; rank 1 =
    best) and the share of lists whose best response is strictly longer than the worst, or mean tokens of
    desirable vs undesirable completions (unpaired)."""
    encoded, dropped, truncated, merged = [], 0, 0, 0
    over = Tally()
    by_rank: dict[int, list[int]] = {}
    by_label: dict[str, list[int]] = {"desirable": [], "undesirable": []}
    best_longer = 0
    for index, row in enumerate(rows):
        where = locations[index] if locations else f"{origin} row {index + 1}"
        stats: dict = {}
        item = encode_feedback(row, tokenizer, system_prompt=data_cfg.system_prompt, max_length=data_cfg.max_length,
                               max_prompt_length=data_cfg.max_prompt_length, truncation=data_cfg.truncation,
                               where=where, stats=stats)
        lengths = stats["responses"]
        if "responses" in row:
            for rank, n in enumerate(lengths, start=1):
                by_rank.setdefault(rank, []).append(n)
            best_longer += lengths[0] > lengths[-1]
        else:
            by_label["desirable" if row["label"] else "undesirable"].append(lengths[0])
        if stats["over"]:
            over.add(where, tokens=f"prompt {stats['prompt']} + longest response {max(lengths)}")
        if index < TEMPLATE_CHECK_ROWS and not stats["over"]:
            texts = stats["texts"]
            probe = {"prompt_ids": item["prompt_ids"], "chosen_ids": item["responses_ids"][0],
                     "rejected_ids": item["responses_ids"][-1]}
            merged += check_template(probe, (texts[0], texts[1], texts[-1]), tokenizer, where)
        if item is None:
            dropped += 1
            continue
        truncated += item.pop("truncated")
        encoded.append(item)
        if kept is not None:
            kept.append(index)
    if encoded and "label" in encoded[0]:
        attach_kl_completions(encoded, data_cfg.max_length)
    n = len(rows)
    mean = lambda v: round(sum(v) / len(v), 4) if v else None  # noqa: E731
    if by_rank:
        bias = LengthBias(mean_tokens_by_rank={str(k): mean(v) for k, v in sorted(by_rank.items())},
                          best_longer_than_worst_fraction=round(best_longer / n, 4) if n else None)
    else:
        bias = LengthBias(**{f"{k}_mean_tokens": mean(v) for k, v in by_label.items()})
    return encoded, Tokenization(rows=n, dropped_over_max_length=dropped, truncated=truncated,
                                 over_max_length=_over_max_length(over, data_cfg), length_bias=bias,
                                 template_checks=_template_checks(n, merged))
