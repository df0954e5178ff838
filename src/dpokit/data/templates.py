"""Canonical rows -> token ids: chat templates, BOS/EOS hygiene and truncation.

A pair is encoded as three id lists, `prompt_ids`, `chosen_ids`, `rejected_ids`; the model sees prompt + response.
Responses are tokenized apart from the prompt so the boundary is exact (no token merges across it), and so
the prompt can be shared by both responses (prefix sharing, packing).
"""

from __future__ import annotations

from dpokit.errors import UserError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Fallback for tokenizers without a chat template: plain role-prefixed lines, EOS closes each assistant turn.
PLAIN = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "plain": PLAIN}


def setup_chat_template(tokenizer, chat_template: str | None) -> None:
    """Install a named or literal template on the tokenizer (config wins over the tokenizer's own)."""
    if chat_template:
        tokenizer.chat_template = NAMED_TEMPLATES.get(chat_template, chat_template)


def is_conversational(row: dict) -> bool:
    return isinstance(row["prompt"], list)


def _messages(prompt: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and not (prompt and prompt[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *prompt]
    return list(prompt)


def render(row: dict, tokenizer, system_prompt: str | None = None) -> tuple[str, str, str]:
    """(prompt_text, chosen_text, rejected_text) as the model will see them."""
    if not is_conversational(row):
        return row["prompt"], row["chosen"], row["rejected"]
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise UserError(
            f"conversational data (messages) needs a chat template, and the tokenizer of {name} has none; set "
            "data.chat_template to 'chatml', 'plain' or a Jinja template, or use a chat model"
        )
    messages = _messages(row["prompt"], system_prompt)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    responses = []
    for key in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(messages + row[key], tokenize=False)
        if full.startswith(prompt_text):
            responses.append(full[len(prompt_text):])
        else:  # templates that rewrite history (e.g. strip reasoning) break the prefix; keep the content + EOS
            responses.append(row[key][-1]["content"] + (tokenizer.eos_token or ""))
    return prompt_text, responses[0], responses[1]


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
                truncation="prompt_left", where: str = "row") -> dict | None:
    """Token ids of one canonical row, truncated per `truncation`; None when the pair is dropped."""
    prompt_text, chosen_text, rejected_text = render(row, tokenizer, system_prompt)
    conversational = is_conversational(row)
    prompt = _encode_prompt(prompt_text, tokenizer)
    # Plain-text responses get an EOS; chat templates close the turn themselves.
    chosen = _encode_response(chosen_text, tokenizer, add_eos=not conversational)
    rejected = _encode_response(rejected_text, tokenizer, add_eos=not conversational)
    longest = max(len(chosen), len(rejected))
    too_long = len(prompt) + longest > max_length or (max_prompt_length and len(prompt) > max_prompt_length)
    truncated = False
    if too_long:
        if truncation == "error":
            raise UserError(
                f"{where}: prompt + response is {len(prompt) + longest} tokens, over data.max_length={max_length}; "
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
        chosen, rejected = chosen[:room], rejected[:room]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated}


def encode_rows(rows: list[dict], tokenizer, data_cfg, origin: str = "data") -> tuple[list[dict], dict]:
    """Encode every row; returns the encoded pairs and counts (dropped / truncated)."""
    encoded, dropped, truncated = [], 0, 0
    for index, row in enumerate(rows):
        pair = encode_pair(row, tokenizer, system_prompt=data_cfg.system_prompt, max_length=data_cfg.max_length,
                           max_prompt_length=data_cfg.max_prompt_length, truncation=data_cfg.truncation,
                           where=f"{origin} row {index + 1}")
        if pair is None:
            dropped += 1
            continue
        truncated += pair.pop("truncated")
        encoded.append(pair)
    return encoded, {"dropped_over_max_length": dropped, "truncated": truncated}
