"""Judges decide whether the tuned model's answer beats the base model's.

Two kinds, one comparison API:
- pointwise judges map (prompt, response) -> float, higher is better: `.score(prompts, responses) -> list[float]`;
- pairwise judges look at both answers at once: `.compare(prompts, a, b) -> list[int | None]`
  (+1: a better, 0: tie, -1: b better, None: the judge's answer could not be parsed).

`compare(judge, prompts, a, b)` works with either kind and returns a `Comparison`, so win/tie/loss counting never
needs to know which kind it got.

Registry: JUDGES name -> factory(options dict) -> judge. `build_judge(name, options)` validates the options.
Judges: sentiment (VADER), reward-model (a sequence classifier), llm (a chat model, local or over HTTP, asked in
both orders), python (`module:function`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.errors import UserError


@dataclass
class Comparison:
    """Per-pair outcome of a vs b: +1 a wins, 0 tie, -1 b wins, None unparseable. Scores only for pointwise."""

    outcomes: list[int | None]
    scores_a: list[float] | None = None
    scores_b: list[float] | None = None
    details: dict = field(default_factory=dict)


def sign(x: float, tie_margin: float = 0.0) -> int:
    return 0 if abs(x) <= tie_margin else (1 if x > 0 else -1)


def compare(judge, prompts: list, a: list[str], b: list[str]) -> Comparison:
    """Compare answer lists a and b with any judge. Pointwise: score both, the higher score wins (ties within the
    judge's `tie_margin`). Pairwise: the judge's own verdicts."""
    if getattr(judge, "kind", "pointwise") == "pairwise":
        outcomes = judge.compare(prompts, a, b)
        return Comparison(outcomes=outcomes, details=dict(getattr(judge, "last_details", {}) or {}))
    scores_a = [float(s) for s in judge.score(prompts, a)]
    scores_b = [float(s) for s in judge.score(prompts, b)]
    margin = float(getattr(judge, "tie_margin", 0.0))
    return Comparison(outcomes=[sign(x - y, margin) for x, y in zip(scores_a, scores_b, strict=False)],
                      scores_a=scores_a, scores_b=scores_b)


def _options(name: str, options: dict, allowed: dict) -> dict:
    """Options merged over defaults; unknown keys are a user error naming the valid ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"eval.judge_options: unknown option(s) {', '.join(unknown)} for judge {name!r}; "
                        f"valid: {', '.join(allowed) or '(none)'}")
    return {**allowed, **options}


def _prompt_str(prompt) -> str:
    """A canonical prompt (string or messages) as plain text for judges that read text."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# --- sentiment ---------------------------------------------------------------------------------------------------

@dataclass
class SentimentJudge:
    """VADER's compound sentiment score (-1 .. 1) of the response; offline lexicon. Prompt is ignored."""

    tie_margin: float = 0.0
    kind = "pointwise"

    def __post_init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        return [self._analyzer.polarity_scores(r)["compound"] for r in responses]


def _sentiment(options: dict) -> SentimentJudge:
    opts = _options("sentiment", options, {"tie_margin": 0.0})
    return SentimentJudge(tie_margin=float(opts["tie_margin"]))


# --- reward model ------------------------------------------------------------------------------------------------

class RewardModelJudge:
    """A sequence classifier (AutoModelForSequenceClassification) scores prompt + response. One label: its logit;
    several: the log-probability of label `label` (default: the last one, usually 'positive'/'good')."""

    kind = "pointwise"

    def __init__(self, model: str, batch_size: int = 16, max_length: int = 1024, label: int | None = None,
                 use_chat_template: bool | None = None, tie_margin: float = 0.0):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpokit.models import resolve_model_path

        path = resolve_model_path(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"eval.judge_options.model: cannot load reward model {model!r} ({first}); give a "
                            "folder or hub id of a sequence-classification model with safetensors weights") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.batch_size, self.max_length, self.label = batch_size, max_length, label
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self.tie_margin = tie_margin

    def text(self, prompt, response: str) -> str:
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                      tokenize=False)
        return _prompt_str(prompt) + response

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        import torch

        texts = [self.text(p, r) for p, r in zip(prompts, responses, strict=False)]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length).to(self.device)
                logits = self.model(**enc).logits.float()
                if logits.shape[-1] == 1:
                    scores.extend(logits[:, 0].cpu().tolist())
                else:
                    label = logits.shape[-1] - 1 if self.label is None else self.label
                    scores.extend(torch.log_softmax(logits, -1)[:, label].cpu().tolist())
        return scores


def _reward_model(options: dict) -> RewardModelJudge:
    opts = _options("reward-model", options, {"model": None, "batch_size": 16, "max_length": 1024, "label": None,
                                              "use_chat_template": None, "tie_margin": 0.0})
    if not opts["model"]:
        raise UserError("eval.judge_options.model: the reward-model judge needs a model id or folder, e.g. "
                        "--set eval.judge_options.model=OpenAssistant/reward-model-deberta-v3-large-v2")
    return RewardModelJudge(**opts)


# --- llm (pairwise) ----------------------------------------------------------------------------------------------

PAIRWISE_TEMPLATE = (
    "You compare two answers to the same request. Reply with exactly one letter: A if answer A is better, B if "
    "answer B is better. Reply 'tie' only if they are equally good.\n\n"
    "Request:\n{prompt}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer is better? Reply A, B or tie."
)
_VERDICT = re.compile(r"^\W*(A|B|tie)\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B' or 'tie' from the judge's reply, read from its start; anything else is unparseable (None)."""
    if not text:
        return None
    match = _VERDICT.match(text.strip())
    if not match:
        return None
    word = match.group(1)
    return "tie" if word.lower() == "tie" else word.upper()


class HTTPChat:
    """An OpenAI-compatible /chat/completions endpoint. The API key is read from the environment on each call and
    only ever sent in the Authorization header: never stored on disk, logged or put in an error message."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None, timeout: float, max_tokens: int):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout, self.max_tokens = model, api_key_env, timeout, max_tokens
        if api_key_env and not os.environ.get(api_key_env):
            raise UserError(f"eval.judge_options.api_key_env: environment variable {api_key_env} is not set; "
                            f"export {api_key_env}=... or drop api_key_env for an endpoint without a key")

    def __call__(self, message: str) -> str | None:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": message}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = "Bearer " + os.environ[self.api_key_env]
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise UserError(f"eval.judge_options.base_url: {self.url} answered HTTP {err.code}; check the URL, "
                            "model name and API key") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"eval.judge_options.base_url: cannot reach {self.url} ({reason}); start the server "
                            "or fix base_url") from None
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None  # a malformed response counts as an unparseable answer


class LocalChat:
    """A local HF causal LM (hub id, folder or alias) answering greedily through its chat template."""

    def __init__(self, model: str, max_tokens: int, batch_size: int):
        from dpokit.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model)
        import torch

        self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.max_tokens, self.batch_size = max_tokens, batch_size

    def batch(self, messages: list[str]) -> list[str]:
        from dpokit.eval.generation import generate

        prompts = [[{"role": "user", "content": m}] for m in messages] if self.tokenizer.chat_template else messages
        out = generate(self.model, self.tokenizer, prompts, max_new_tokens=self.max_tokens, temperature=0.0,
                       batch_size=self.batch_size)
        return [o[0] for o in out]


class LLMJudge:
    """Pairwise judge: asks a chat model which answer is better, once as (A=a, B=b) and once as (A=b, B=a).

    A pair's verdict is the sum of both readings: agreement gives a win or loss, disagreement (e.g. a judge that
    always says 'A') a tie, so position bias cancels instead of favouring whichever model is shown first. A pair
    where either reading is unparseable is counted as unparseable and left out of the rates, never guessed.
    """

    kind = "pairwise"

    def __init__(self, chat, template: str = PAIRWISE_TEMPLATE):
        self.chat = chat
        self.template = template
        self.last_details: dict = {}

    def _ask(self, messages: list[str]) -> list[str | None]:
        if hasattr(self.chat, "batch"):
            return self.chat.batch(messages)
        return [self.chat(m) for m in messages]

    def compare(self, prompts: list, a: list[str], b: list[str]) -> list[int | None]:
        texts = [_prompt_str(p) for p in prompts]
        forward = [self.template.format(prompt=p, a=x, b=y) for p, x, y in zip(texts, a, b, strict=False)]
        swapped = [self.template.format(prompt=p, a=y, b=x) for p, x, y in zip(texts, a, b, strict=False)]
        replies = self._ask(forward + swapped)
        first = [parse_verdict(r) for r in replies[:len(forward)]]
        second = [parse_verdict(r) for r in replies[len(forward):]]
        outcomes: list[int | None] = []
        consistent = inconsistent = unparseable_answers = 0
        for v1, v2 in zip(first, second, strict=False):
            unparseable_answers += (v1 is None) + (v2 is None)
            if v1 is None or v2 is None:
                outcomes.append(None)
                continue
            p1 = {"A": 1, "B": -1, "tie": 0}[v1]   # a was shown as A
            p2 = {"A": -1, "B": 1, "tie": 0}[v2]   # a was shown as B
            if p1 == p2:
                consistent += 1
            else:
                inconsistent += 1
            outcomes.append(sign(p1 + p2))
        self.last_details = {
            "orders_asked": 2, "answers": len(replies), "unparseable_answers": unparseable_answers,
            "position_consistent_pairs": consistent, "position_inconsistent_pairs": inconsistent,
            "first_position_picked": sum(v == "A" for v in first + second),
            "second_position_picked": sum(v == "B" for v in first + second),
            "raw_examples": [r for r in replies[:3]],
        }
        return outcomes


def _llm(options: dict) -> LLMJudge:
    opts = _options("llm", options, {"model": None, "base_url": None, "api_key_env": None, "template": None,
                                     "max_tokens": 8, "timeout": 60.0, "batch_size": 8})
    if not opts["model"]:
        raise UserError("eval.judge_options.model: the llm judge needs a model: a local HF id/folder/alias, or the "
                        "model name at base_url")
    template = opts["template"] or PAIRWISE_TEMPLATE
    for slot in ("{prompt}", "{a}", "{b}"):
        if slot not in template:
            raise UserError(f"eval.judge_options.template: must contain {slot} (and {{prompt}}, {{a}}, {{b}})")
    if opts["base_url"]:
        chat = HTTPChat(opts["base_url"], opts["model"], opts["api_key_env"], float(opts["timeout"]),
                        int(opts["max_tokens"]))
    else:
        chat = LocalChat(opts["model"], int(opts["max_tokens"]), int(opts["batch_size"]))
    return LLMJudge(chat, template)


# --- python ------------------------------------------------------------------------------------------------------

def load_function(spec: str):
    """`package.module:function` or `path/to/file.py:function` -> the callable."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise UserError(f"eval.judge_options.function: {spec!r} must look like module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise UserError(f"eval.judge_options.function: file {path} not found")
            mod_spec = importlib.util.spec_from_file_location(f"dpokit_judge_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"eval.judge_options.function: cannot import {module_name!r} ({err}); put it on "
                        "PYTHONPATH or give a file path") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"eval.judge_options.function: {module_name!r} has no function {func_name!r}")
    return func


@dataclass
class PythonJudge:
    """Your own scoring function: `fn(prompt, response) -> float` (higher is better)."""

    function: object
    tie_margin: float = 0.0
    kind = "pointwise"

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses, strict=False):
            value = self.function(p, r)
            try:
                out.append(float(value))
            except (TypeError, ValueError):
                raise UserError(f"eval.judge_options.function: returned {value!r}, not a number") from None
        return out


def _python(options: dict) -> PythonJudge:
    opts = _options("python", options, {"function": None, "tie_margin": 0.0})
    if not opts["function"]:
        raise UserError("eval.judge_options.function: the python judge needs module:function")
    return PythonJudge(load_function(opts["function"]), float(opts["tie_margin"]))


JUDGES = {"sentiment": _sentiment, "reward-model": _reward_model, "llm": _llm, "python": _python}


def build_judge(name: str, options: dict | None = None):
    if name not in JUDGES:
        raise UserError(f"eval.judge: unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    return JUDGES[name](dict(options or {}))
