"""Chat templates: named templates (chatml, plain), installing one on a tokenizer, and rendering a canonical row
as the text the model sees. Pair encoding (token ids, truncation) is `dpokit.data.encode`."""

from __future__ import annotations

from dpokit.core.errors import UserError

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
    prompt_text, (chosen, rejected) = render_responses(row["prompt"], [row["chosen"], row["rejected"]], tokenizer,
                                                       system_prompt)
    return prompt_text, chosen, rejected


def render_responses(prompt, responses: list, tokenizer, system_prompt: str | None = None) -> tuple[str, list[str]]:
    """(prompt_text, [response_text, ...]) as the model will see them: any number of responses to one prompt."""
    if isinstance(prompt, str):
        return prompt, list(responses)
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise UserError(
            f"conversational data (messages) needs a chat template, and the tokenizer of {name} has none; set "
            "data.chat_template to 'chatml', 'plain' or a Jinja template, or use a chat model"
        )
    messages = _messages(prompt, system_prompt)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    texts = []
    for response in responses:
        full = tokenizer.apply_chat_template(messages + response, tokenize=False)
        if full.startswith(prompt_text):
            texts.append(full[len(prompt_text):])
        else:  # templates that rewrite history (e.g. strip reasoning) break the prefix; keep the content + EOS
            texts.append(response[-1]["content"] + (tokenizer.eos_token or ""))
    return prompt_text, texts
