"""Judges decide whether the tuned model's answer beats the base model's.

Two kinds, one comparison API:
- pointwise judges map (prompt, response) -> float, higher is better: `.score(prompts, responses) -> list[float]`;
- pairwise judges look at both answers at once: `.compare(prompts, a, b) -> list[int | None]`
  (+1: a better, 0: tie, -1: b better, None: the judge's answer could not be parsed).

`compare(judge, prompts, a, b)` works with either kind and returns a `Comparison`, so win/tie/loss counting never
needs to know which kind it got.

Registry: JUDGES name -> factory(options dict) -> judge; JUDGE_OPTIONS name -> its options and their defaults.
`check_judge(name, options, key)` lists every problem of a judge config without loading any model (the training
plan runs it before training); `build_judge(name, options)` runs the same checks, then builds the judge.
Judges: sentiment (VADER), reward-model (a sequence classifier), llm (a chat model, local or over HTTP, asked in
both orders), python (`module:function`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.core.errors import UserError


@dataclass
class Comparison:
    """Per-pair outcome of a vs b: +1 a wins, 0 tie, -1 b wins, None unparseable. Scores only for pointwise."""

    outcomes: list[int | None]
    scores_a: list[float] | None = None
    scores_b: list[float] | None = None
    details: dict = field(default_factory=dict)


def sign(x: float, tie_margin: float = 0.0) -> int:
    return 0 if abs(x) <= tie_margin else (1 if x > 0 else -1)


def compare(judge, prompts: list, a: list[str], b: list[str], scores_b: list[float] | None = None) -> Comparison:
    """Compare answer lists a and b with any judge. Pointwise: score both, the higher score wins (ties within the
    judge's `tie_margin`). Pairwise: the judge's own verdicts. `scores_b`: b's pointwise scores already computed
    (the same answers judged before; training's checkpoint selection scores the base answers once)."""
    if getattr(judge, "kind", "pointwise") == "pairwise":
        outcomes = judge.compare(prompts, a, b)
        return Comparison(outcomes=outcomes, details=dict(getattr(judge, "last_details", {}) or {}))
    scores_a = [float(s) for s in judge.score(prompts, a)]
    scores_b = [float(s) for s in (judge.score(prompts, b) if scores_b is None else scores_b)]
    margin = float(getattr(judge, "tie_margin", 0.0))
    return Comparison(outcomes=[sign(x - y, margin) for x, y in zip(scores_a, scores_b, strict=False)],
                      scores_a=scores_a, scores_b=scores_b)


# Each judge's options and their defaults: the one list the builders merge over and `check_judge` validates.
JUDGE_OPTIONS: dict[str, dict] = {
    "sentiment": {"tie_margin": 0.0},
    "reward-model": {"model": None, "batch_size": 16, "max_length": 1024, "label": None,
                     "use_chat_template": None, "tie_margin": 0.0},
    "llm": {"model": None, "base_url": None, "api_key_env": None, "template": None, "max_tokens": 8,
            "timeout": 60.0, "batch_size": 8},
    "python": {"function": None, "tie_margin": 0.0},
}


def _did_you_mean(value, choices) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_options(name: str, options: dict, key: str = "eval") -> str | None:
    allowed = JUDGE_OPTIONS[name]
    unknown = sorted(set(options) - set(allowed), key=str)
    if not unknown:
        return None
    hint = _did_you_mean(unknown[0], allowed) if len(unknown) == 1 else ""
    return (f"{key}.judge_options: unknown option(s) {', '.join(map(str, unknown))} for judge {name!r}; "
            f"valid: {', '.join(allowed) or '(none)'}{hint}")


def _options(name: str, options: dict, key: str = "eval") -> dict:
    """Options merged over the judge's defaults (JUDGE_OPTIONS); unknown keys are a user error naming the valid
    ones."""
    problem = _unknown_options(name, options, key)
    if problem:
        raise UserError(problem)
    return {**JUDGE_OPTIONS[name], **options}


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


def _sentiment(options: dict, key: str = "eval") -> SentimentJudge:
    opts = _options("sentiment", options, key)
    return SentimentJudge(tie_margin=float(opts["tie_margin"]))


# --- reward model ------------------------------------------------------------------------------------------------

class RewardModelJudge:
    """A sequence classifier (AutoModelForSequenceClassification) scores prompt + response. One label: its logit;
    several: the log-probability of label `label` (default: the last one, usually 'positive'/'good')."""

    kind = "pointwise"

    def __init__(self, model: str, batch_size: int = 16, max_length: int = 1024, label: int | None = None,
                 use_chat_template: bool | None = None, tie_margin: float = 0.0, key: str = "eval"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpokit.core.models import resolve_model_path

        path = resolve_model_path(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"{key}.judge_options.model: cannot load reward model {model!r} ({first}); give a "
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


def _reward_model(options: dict, key: str = "eval") -> RewardModelJudge:
    opts = _options("reward-model", options, key)
    if not opts["model"]:
        raise UserError(_needs_model("reward-model", key))
    return RewardModelJudge(**opts, key=key)


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

    def __init__(self, base_url: str, model: str, api_key_env: str | None, timeout: float, max_tokens: int,
                 key: str = "eval"):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout, self.max_tokens = model, api_key_env, timeout, max_tokens
        self.key = key
        if api_key_env and not os.environ.get(api_key_env):
            raise UserError(_env_not_set(api_key_env, key))

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
            raise UserError(f"{self.key}.judge_options.base_url: {self.url} answered HTTP {err.code}; check the URL, "
                            "model name and API key") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"{self.key}.judge_options.base_url: cannot reach {self.url} ({reason}); start the server "
                            "or fix base_url") from None
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None  # a malformed response counts as an unparseable answer


class LocalChat:
    """A local HF causal LM (hub id, folder or alias) answering greedily through its chat template."""

    def __init__(self, model: str, max_tokens: int, batch_size: int):
        from dpokit.core.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model)
        import torch

        self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.max_tokens, self.batch_size = max_tokens, batch_size

    def batch(self, messages: list[str]) -> list[str]:
        from dpokit.core.sampling import generate

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


def _llm(options: dict, key: str = "eval") -> LLMJudge:
    opts = _options("llm", options, key)
    if not opts["model"]:
        raise UserError(_needs_model("llm", key))
    template = opts["template"] or PAIRWISE_TEMPLATE
    problem = _template_problem(template, key)
    if problem:
        raise UserError(problem)
    if opts["base_url"]:
        chat = HTTPChat(opts["base_url"], opts["model"], opts["api_key_env"], float(opts["timeout"]),
                        int(opts["max_tokens"]), key=key)
    else:
        chat = LocalChat(opts["model"], int(opts["max_tokens"]), int(opts["batch_size"]))
    return LLMJudge(chat, template)


# --- python ------------------------------------------------------------------------------------------------------

_LOADED_FILES: dict[tuple[str, int], object] = {}  # (resolved path, mtime_ns) -> module: a file runs once


def load_function(spec: str, key: str = "eval"):
    """`package.module:function` or `path/to/file.py:function` -> the callable."""
    where = f"{key}.judge_options.function"
    module_name, _, func_name = str(spec).rpartition(":")
    if not module_name or not func_name:
        raise UserError(f"{where}: {spec!r} is not a function reference; give module:function or "
                        "file.py:function, e.g. ./my_judge.py:score")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise UserError(f"{where}: file {path} not found; give an existing .py file (absolute, or relative "
                                "to the current directory) as file.py:function")
            cache_key = (str(path.resolve()), path.stat().st_mtime_ns)
            module = _LOADED_FILES.get(cache_key)
            if module is None:
                mod_spec = importlib.util.spec_from_file_location(f"dpokit_judge_{path.stem}", path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[mod_spec.name] = module
                # Checking a config writes nothing, not even a __pycache__ folder next to the user's file.
                dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
                try:
                    mod_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(mod_spec.name, None)
                    raise
                finally:
                    sys.dont_write_bytecode = dont_write
                _LOADED_FILES[cache_key] = module
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except ImportError as err:
        raise UserError(f"{where}: cannot import {module_name!r} ({err}); put it on "
                        "PYTHONPATH or give a file path") from None
    except Exception as err:  # the user's module itself fails: a syntax error, an exception at import time
        first = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"{where}: importing {module_name!r} failed ({type(err).__name__}: {first}); fix that "
                        "module") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{where}: {module_name!r} has no function {func_name!r}; define "
                        f"def {func_name}(prompt, response) -> float there, or name an existing function")
    return func


@dataclass
class PythonJudge:
    """Your own scoring function: `fn(prompt, response) -> float` (higher is better)."""

    function: object
    tie_margin: float = 0.0
    key: str = "eval"
    kind = "pointwise"

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses, strict=False):
            value = self.function(p, r)
            try:
                out.append(float(value))
            except (TypeError, ValueError):
                raise UserError(f"{self.key}.judge_options.function: returned {value!r}, not a number; return "
                                "a float (higher is better)") from None
        return out


def _python(options: dict, key: str = "eval") -> PythonJudge:
    opts = _options("python", options, key)
    if not opts["function"]:
        raise UserError(_needs_model("python", key))
    return PythonJudge(load_function(opts["function"], key), float(opts["tie_margin"]), key)


JUDGES = {"sentiment": _sentiment, "reward-model": _reward_model, "llm": _llm, "python": _python}


# --- static checks -----------------------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_PREFIXES = ("sk-", "sk_", "hf_", "ghp_", "gho_", "ghs_", "github_pat_", "xoxb-", "xoxp-", "AKIA", "AIza",
                    "Bearer ", "bearer ")
# option -> (integer only, smallest allowed value, the bound is strict)
_NUMERIC = {"tie_margin": (False, 0, False), "batch_size": (True, 1, False), "max_tokens": (True, 1, False),
            "max_length": (True, 1, False), "timeout": (False, 0, True)}


def _needs_model(name: str, key: str) -> str:
    if name == "reward-model":
        return (f"{key}.judge_options.model: the reward-model judge needs a model; give a hub id or folder of a "
                f"sequence classifier, e.g. --set {key}.judge_options.model=OpenAssistant/reward-model-deberta-v3-large-v2")
    if name == "llm":
        return (f"{key}.judge_options.model: the llm judge needs a model; give a local HF id/folder/alias, or the "
                "model name at base_url")
    return (f"{key}.judge_options.function: the python judge needs a function; give module:function or "
            f"file.py:function, e.g. --set {key}.judge_options.function=./my_judge.py:score")


def _env_not_set(name: str, key: str) -> str:
    return (f"{key}.judge_options.api_key_env: environment variable {name} is not set; "
            f"export {name}=... or drop api_key_env for an endpoint without a key")


def _template_problem(template, key: str) -> str | None:
    if not isinstance(template, str):
        return f"{key}.judge_options.template: not a string; give a text with {{prompt}}, {{a}} and {{b}}"
    missing = [slot for slot in ("{prompt}", "{a}", "{b}") if slot not in template]
    if missing:
        return (f"{key}.judge_options.template: must contain {', '.join(missing)} (and {{prompt}}, {{a}}, {{b}}); "
                "add the missing placeholder(s)")
    return None


def _looks_like_secret(value: str) -> bool:
    if value.startswith(_SECRET_PREFIXES):
        return True
    # Long random-looking strings (mixed case and digits) are keys, not variable names like OPENAI_API_KEY.
    return len(value) >= 20 and any(c.islower() for c in value) and any(c.isupper() for c in value) \
        and any(c.isdigit() for c in value)


def _is_local(value: str) -> bool:
    from dpokit.core.config import looks_like_local_path

    return value.startswith(("/", "./", "../", "~")) or looks_like_local_path(value) \
        or os.path.exists(os.path.expanduser(value))


def _check_numbers(name: str, given: dict, key: str) -> list[str]:
    problems = []
    for option, (integer, low, strict) in _NUMERIC.items():
        if option not in given or given[option] is None:
            continue
        value = given[option]
        kind = "an integer" if integer else "a number"
        bound = f"> {low}" if strict else f">= {low}"
        wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or (integer and not isinstance(value, numbers.Integral))
        if wrong_type or value != value or value < low or (strict and value == low):
            example = JUDGE_OPTIONS[name][option]
            problems.append(f"{key}.judge_options.{option}: must be {kind} {bound}, got {value!r}; "
                            f"e.g. --set {key}.judge_options.{option}={example}")
    return problems


def _check_reward_model(opts: dict, given: dict, key: str) -> list[str]:
    model = opts["model"]
    if not model:
        return [_needs_model("reward-model", key)]
    if not isinstance(model, str):
        return [f"{key}.judge_options.model: got a {type(model).__name__}; give a model id or folder (a string)"]
    problems = []
    if _is_local(model):
        path = Path(model).expanduser()
        why = None
        if not path.exists():
            why = "folder not found"
        elif not path.is_dir():
            why = "not a folder"
        elif not (path / "config.json").is_file():
            why = "no config.json in that folder"
        if why:
            problems.append(f"{key}.judge_options.model: cannot load reward model {model!r} ({why}); give a folder "
                            "of a sequence-classification model (config.json + safetensors weights) or a hub id")
    value = given.get("use_chat_template")
    if value is not None and not isinstance(value, bool):
        problems.append(f"{key}.judge_options.use_chat_template: got {value!r}; use true, false or null (auto)")
    value = given.get("label")
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        problems.append(f"{key}.judge_options.label: got {value!r}; give the index of the preferred label (an "
                        "integer) or null (the last label)")
    return problems


def _check_llm(opts: dict, given: dict, key: str) -> list[str]:
    problems = []
    model, base_url, env = opts["model"], opts["base_url"], opts["api_key_env"]
    if not model:
        problems.append(_needs_model("llm", key))
    elif not isinstance(model, str):
        problems.append(f"{key}.judge_options.model: got a {type(model).__name__}; give a model name (a string)")
    elif not base_url and _is_local(model) and not os.path.exists(os.path.expanduser(model)):
        problems.append(f"{key}.judge_options.model: folder {model!r} not found; give an existing model folder, a "
                        "hub id or alias, or set base_url to ask a model served over HTTP")
    if opts["template"] is not None:
        problem = _template_problem(opts["template"], key)
        if problem:
            problems.append(problem)
    if base_url is not None and (not isinstance(base_url, str)
                                 or not base_url.startswith(("http://", "https://"))):
        problems.append(f"{key}.judge_options.base_url: {base_url!r} is not an http(s) URL; start it with http:// "
                        "or https://, e.g. http://127.0.0.1:8000/v1")
    if env is not None:
        # Never echo a value that may be the key itself: it would end up in logs and terminals.
        if not isinstance(env, str) or not env:
            problems.append(f"{key}.judge_options.api_key_env: empty or not a string; give the name of an "
                            "environment variable, e.g. OPENAI_API_KEY")
        elif _looks_like_secret(env):
            problems.append(f"{key}.judge_options.api_key_env: looks like an API key itself, not the name of an "
                            "environment variable (value not shown); put the key in an environment variable, e.g. "
                            "export OPENAI_API_KEY=..., and give its name: api_key_env: OPENAI_API_KEY")
        elif not _ENV_NAME.match(env):
            problems.append(f"{key}.judge_options.api_key_env: not a valid environment variable name (value not "
                            "shown); use letters, digits and _, not starting with a digit, e.g. OPENAI_API_KEY")
        elif base_url and not os.environ.get(env):
            problems.append(_env_not_set(env, key))
    return problems


def _check_python(opts: dict, given: dict, key: str) -> list[str]:
    spec = opts["function"]
    if not spec:
        return [_needs_model("python", key)]
    if not isinstance(spec, str):
        return [f"{key}.judge_options.function: got a {type(spec).__name__}; give a string module:function or "
                "file.py:function"]
    try:
        load_function(spec, key)  # importing the user's module is cheap, and what build_judge does anyway
    except UserError as err:
        return [str(err)]
    return []


_CHECKS = {"reward-model": _check_reward_model, "llm": _check_llm, "python": _check_python}


def check_judge(name: str, options: dict | None, key: str = "eval") -> list[str]:
    """Every problem of a judge config, each naming its config key (`key`.judge / `key`.judge_options.*) and the
    fix; [] when it is fine. Static and cheap: loads no model weights and makes no network call (a python judge's
    module is imported, as building it would). `key`: the config section, eval or pairs."""
    if not isinstance(name, str) or name not in JUDGES:
        return [f"{key}.judge: unknown judge {name!r}; choose one of {', '.join(JUDGES)}"
                f"{_did_you_mean(name, JUDGES)}"]
    if options is None:
        options = {}
    if not isinstance(options, dict):
        return [f"{key}.judge_options: got a {type(options).__name__}; give a mapping of option: value"]
    problems = []
    unknown = _unknown_options(name, options, key)
    if unknown:
        problems.append(unknown)
    given = {k: v for k, v in options.items() if k in JUDGE_OPTIONS[name]}
    opts = {**JUDGE_OPTIONS[name], **given}
    problems += _check_numbers(name, given, key)
    if name in _CHECKS:
        problems += _CHECKS[name](opts, given, key)
    return problems


def build_judge(name: str, options: dict | None = None, key: str = "eval"):
    """The judge `name` with `options`; the same checks as `check_judge` first, all problems in one UserError."""
    problems = check_judge(name, options, key)
    if problems:
        raise UserError("; ".join(problems))
    return JUDGES[name](dict(options or {}), key)
