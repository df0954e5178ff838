"""Judges decide whether the tuned model's answer beats the base model's.

Two kinds, one comparison API:
- pointwise judges map (prompt, response) -> float, higher is better: `.score(prompts, responses) -> list[float]`;
- pairwise judges look at both answers at once: `.compare(prompts, a, b) -> list[int | None]`
  (+1: a better, 0: tie, -1: b better, None: the judge's answer could not be parsed).

`compare(judge, prompts, a, b)` works with either kind and returns a `Comparison`, so win/tie/loss counting never
needs to know which kind it got.

Registry: JUDGES name -> `JudgeKind` (name, options model, builder), the one place a judge is registered; its
pydantic options model (a `JudgeOptions`) holds defaults, help and checks. `check_judge(name, options, key)` lists
every problem without loading any model (the training plan runs it before training); `build_judge` runs the same
checks, then builds. Judges: sentiment, reward-model, llm (asked in both orders), python (`module:function`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, get_args

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

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


def compare(judge, prompts: list, a: list[str], b: list[str], scores_b: list[float] | None = None,
            images: list[list] | None = None) -> Comparison:
    """Compare answer lists a and b with any judge. Pointwise: score both, the higher score wins (ties within the
    judge's `tie_margin`). Pairwise: the judge's own verdicts. `scores_b`: b's pointwise scores already computed
    (the same answers judged before; training's checkpoint selection scores the base answers once). `images`: each
    prompt's PIL images (vision runs), handed to a judge that takes them (`takes_images`)."""
    if getattr(judge, "kind", "pointwise") == "pairwise":
        outcomes = judge.compare(prompts, a, b)
        return Comparison(outcomes=outcomes, details=dict(getattr(judge, "last_details", {}) or {}))
    extra = {"images": images} if images is not None and getattr(judge, "takes_images", False) else {}
    scores_a = [float(s) for s in judge.score(prompts, a, **extra)]
    scores_b = [float(s) for s in (judge.score(prompts, b, **extra) if scores_b is None else scores_b)]
    margin = float(getattr(judge, "tie_margin", 0.0))
    return Comparison(outcomes=[sign(x - y, margin) for x, y in zip(scores_a, scores_b, strict=False)],
                      scores_a=scores_a, scores_b=scores_b)


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
            raise UserError(f"{key}.judge_options.api_key_env: {_env_not_set(api_key_env)}")

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


# --- python ------------------------------------------------------------------------------------------------------

_LOADED_FILES: dict[tuple[str, int], object] = {}  # (resolved path, mtime_ns) -> module: a file runs once


def load_function(spec: str, key: str = "eval"):
    """`package.module:function` or `path/to/file.py:function` -> the callable, or a UserError naming the fix."""
    try:
        return _import_function(spec)
    except ValueError as err:
        raise UserError(f"{key}.judge_options.function: {err}") from None


def _import_function(spec: str):
    module_name, _, func_name = str(spec).rpartition(":")
    if not module_name or not func_name:
        raise ValueError(f"{spec!r} is not a function reference; give module:function or file.py:function, e.g. "
                         "./my_judge.py:score")
    path = Path(module_name).expanduser()
    if module_name.endswith(".py") and not path.is_file():
        raise ValueError(f"file {path} not found; give an existing .py file (absolute, or relative to the current "
                         "directory) as file.py:function")
    try:
        module = _load_file(path) if module_name.endswith(".py") else importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} ({err}); put it on PYTHONPATH or give a file path") from None
    except Exception as err:  # the user's module itself fails: a syntax error, an exception at import time
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"importing {module_name!r} failed ({type(err).__name__}: {first}); fix that "
                         "module") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"{module_name!r} has no function {func_name!r}; define def {func_name}(prompt, response) "
                         "-> float there, or name an existing function")
    return func


def _load_file(path: Path):  # a user's .py file as a module, run once per (file, mtime)
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
    return module


def takes_three_arguments(fn) -> bool:
    """Whether `fn` can be called with three positional arguments (a python judge's `score(prompt, response,
    images)`); a two-parameter function is called as before."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3


@dataclass
class PythonJudge:
    """Your own scoring function: `fn(prompt, response) -> float` (higher is better). On a vision run a function
    with a third parameter is called `fn(prompt, response, images)` with the prompt's PIL images."""

    function: object
    tie_margin: float = 0.0
    key: str = "eval"
    kind = "pointwise"

    @property
    def takes_images(self) -> bool:
        return takes_three_arguments(self.function)

    def score(self, prompts: list, responses: list[str], images: list[list] | None = None) -> list[float]:
        out = []
        for k, (p, r) in enumerate(zip(prompts, responses, strict=False)):
            value = self.function(p, r, images[k]) if images is not None and self.takes_images else self.function(p, r)
            try:
                out.append(float(value))
            except (TypeError, ValueError):
                raise UserError(f"{self.key}.judge_options.function: returned {value!r}, not a number; return "
                                "a float (higher is better)") from None
        return out


# --- options: one pydantic model per judge ------------------------------------------------------------------------

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_PREFIXES = ("sk-", "sk_", "hf_", "ghp_", "gho_", "ghs_", "github_pat_", "xoxb-", "xoxp-", "AKIA", "AIza",
                    "Bearer ", "bearer ")


def _key(info: ValidationInfo) -> str:  # the section checked (eval or pairs): check_judge's validation context
    return (info.context or {}).get("key", "eval")


def _env_not_set(name: str) -> str:
    return f"environment variable {name} is not set; export {name}=... or drop api_key_env for an endpoint without a key"


def _looks_like_secret(value: str) -> bool:
    # Long random-looking strings (mixed case and digits) are keys, not variable names like OPENAI_API_KEY.
    return value.startswith(_SECRET_PREFIXES) or len(value) >= 20 and all(
        any(test(c) for c in value) for test in (str.islower, str.isupper, str.isdigit))


def _is_local(value: str) -> bool:
    from dpokit.core.config import looks_like_local_path

    return value.startswith(("/", "./", "../", "~")) or looks_like_local_path(value) \
        or os.path.exists(os.path.expanduser(value))


def _tie_margin():
    return Field(0.0, ge=0, description="Scores within this of each other are a tie.")


class JudgeOptions(BaseModel):
    """A judge's options: unknown keys refused, values as YAML typed them (no '5' -> 5, no true -> 1), a default and
    a help string each. Checks are static: no weights, no network (a python judge's module is imported)."""

    model_config = {"extra": "forbid", "strict": True, "frozen": True}
    needs: ClassVar[str] = ""  # what a missing required option (model, function) means, and what to give

    @field_validator("model", "function", mode="before", check_fields=False)
    def _required(cls, value, info: ValidationInfo):
        if value is None or value == "":
            example = cls.model_fields[info.field_name].examples[0]
            raise ValueError(f"{cls.needs}, e.g. --set {_key(info)}.judge_options.{info.field_name}={example}")
        return value


class SentimentOptions(JudgeOptions):
    """sentiment: VADER's compound score of the answer, offline."""

    tie_margin: float = _tie_margin()


class RewardModelOptions(JudgeOptions):
    """reward-model: a sequence classifier scores prompt + answer."""

    needs = "the reward-model judge needs a model; give a hub id or folder of a sequence classifier"
    model: str | None = Field(None, validate_default=True, examples=["OpenAssistant/reward-model-deberta-v3-large-v2"],
                              description="Hub id or folder of a sequence classifier with safetensors weights.")
    batch_size: int = Field(16, ge=1, description="Answers scored per forward pass.")
    max_length: int = Field(1024, ge=1, description="Max tokens of prompt + answer (longer ones are truncated).")
    label: int | None = Field(None, examples=[0], description="Index of the preferred label of a multi-label "
                              "classifier; None = the last label.")
    use_chat_template: bool | None = Field(None, examples=[True], description="Score the pair through the "
                                           "tokenizer's chat template; None = when it has one.")
    tie_margin: float = _tie_margin()

    @field_validator("model")
    def _model(cls, model: str) -> str:
        path = Path(model).expanduser()
        why = None if not _is_local(model) else "folder not found" if not path.exists() else \
            "not a folder" if not path.is_dir() else "no config.json in that folder" \
            if not (path / "config.json").is_file() else None
        if why:
            raise ValueError(f"cannot load reward model {model!r} ({why}); give a folder of a sequence-classification "
                             "model (config.json + safetensors weights) or a hub id")
        return model


class LLMOptions(JudgeOptions):
    """llm: a chat model, local or over HTTP, asked which answer is better in both orders."""

    needs = "the llm judge needs a model; give a local HF id/folder/alias, or the model name at base_url"
    model: str | None = Field(None, validate_default=True, examples=["smollm2-135m-instruct"], description="A "
                              "local HF chat model (hub id, folder or alias), or with base_url the model name there.")
    base_url: str | None = Field(None, examples=["http://127.0.0.1:8000/v1"], description="An OpenAI-compatible "
                                 "endpoint (/chat/completions is appended); None = run the model locally.")
    api_key_env: str | None = Field(None, examples=["OPENAI_API_KEY"], description="Name of the environment "
                                    "variable holding the endpoint's API key (the key itself is never written).")
    template: str | None = Field(None, description="The question asked, with {prompt}, {a} and {b}; None = "
                                 "dpokit's pairwise template.")
    max_tokens: int = Field(8, ge=1, description="Max tokens of the judge's reply.")
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for the endpoint's answer.")
    batch_size: int = Field(8, ge=1, description="Questions asked together of a local model.")

    @field_validator("base_url")
    def _base_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL; start it with http:// or https://, e.g. "
                             "http://127.0.0.1:8000/v1")
        return url

    @field_validator("api_key_env", mode="before")
    def _api_key_env(cls, env, info: ValidationInfo):
        # Never echo a value that may be the key itself: it would end up in logs and terminals.
        if env is None:
            return env
        if not isinstance(env, str) or not env:
            raise ValueError("empty or not a string; give the name of an environment variable, e.g. OPENAI_API_KEY")
        if _looks_like_secret(env):
            raise ValueError("looks like an API key itself, not the name of an environment variable (value not "
                             "shown); put the key in an environment variable, e.g. export OPENAI_API_KEY=..., and "
                             "give its name: api_key_env: OPENAI_API_KEY")
        if not _ENV_NAME.match(env):
            raise ValueError("not a valid environment variable name (value not shown); use letters, digits and _, "
                             "not starting with a digit, e.g. OPENAI_API_KEY")
        if info.data.get("base_url") and not os.environ.get(env):
            raise ValueError(_env_not_set(env))
        return env

    @field_validator("template", mode="before")
    def _template(cls, template):
        if template is not None and not isinstance(template, str):
            raise ValueError("not a string; give a text with {prompt}, {a} and {b}")
        missing = [slot for slot in ("{prompt}", "{a}", "{b}") if template is not None and slot not in template]
        if missing:
            raise ValueError(f"must contain {', '.join(missing)} (and {{prompt}}, {{a}}, {{b}}); add the missing "
                             "placeholder(s)")
        return template

    @model_validator(mode="after")
    def _local_model(self) -> LLMOptions:
        # Without base_url the model is loaded here, so a path must exist; with it, it is the server's name.
        if not self.base_url and _is_local(self.model) and not os.path.exists(os.path.expanduser(self.model)):
            raise ValueError(f"model: folder {self.model!r} not found; give an existing model folder, a hub id or "
                             "alias, or set base_url to ask a model served over HTTP")
        return self


class PythonOptions(JudgeOptions):
    """python: your own function scores each answer, `function(prompt, response) -> float`; its module is imported
    by the check already (once: a file's top level runs once for check and build)."""

    needs = "the python judge needs a function; give module:function or file.py:function"
    function: str | None = Field(None, validate_default=True, examples=["./my_judge.py:score"], description=""
                                 "package.module:function or path/to/file.py:function; higher is better.")
    tie_margin: float = _tie_margin()

    @field_validator("function")
    def _function(cls, spec: str) -> str:
        _import_function(spec)  # importing the user's module is cheap, and what building the judge does anyway
        return spec


# --- registry ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgeKind:
    """One judge: its config name, its options model and the builder of the judge from validated options."""

    name: str
    options: type[JudgeOptions]
    build: Callable[[JudgeOptions, str], object]


JUDGES: dict[str, JudgeKind] = {kind.name: kind for kind in (
    JudgeKind("sentiment", SentimentOptions, lambda opts, key: SentimentJudge(opts.tie_margin)),
    JudgeKind("reward-model", RewardModelOptions, lambda opts, key: RewardModelJudge(**opts.model_dump(), key=key)),
    JudgeKind("llm", LLMOptions, lambda opts, key: LLMJudge(
        HTTPChat(opts.base_url, opts.model, opts.api_key_env, opts.timeout, opts.max_tokens, key=key) if opts.base_url
        else LocalChat(opts.model, opts.max_tokens, opts.batch_size), opts.template or PAIRWISE_TEMPLATE)),
    JudgeKind("python", PythonOptions,
              lambda opts, key: PythonJudge(load_function(opts.function, key), opts.tie_margin, key)),
)}


# --- images (vision-language runs) ------------------------------------------------------------------------------

IMAGE_BLIND_JUDGES = ("reward-model", "llm")  # read the prompt's text only: they would judge without the picture


def image_judge_problem(name: str, key: str = "eval") -> str | None:
    """Why judge `name` cannot judge answers to image prompts (None when it can): the reward-model and llm judges
    read text only, so an answer about a picture would be scored without the picture."""
    if name not in IMAGE_BLIND_JUDGES:
        return None
    return (f"{key}.judge: {name} reads text only and cannot see the prompts' images of a vision-language run; use "
            f"{key}.judge: python with a function score(prompt, response, images) (it receives the PIL images), "
            f"or {key}.generate: false for the held-out preference metrics alone")


# --- check and build ---------------------------------------------------------------------------------------------

def _did_you_mean(value, choices) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _expected(field) -> str:
    """What a field takes, in words, from its type and bounds: 'an integer >= 1', 'a number > 0', 'a string'."""
    words = {int: "an integer", float: "a number", bool: "true, false", str: "a string"}
    types = (field.annotation, *get_args(field.annotation))
    text = next((words[t] for t in types if t in words), "valid")
    text += " or null" if type(None) in types and str not in types else ""  # a null model or function is missing
    bounds = [f">= {m.ge}" if hasattr(m, "ge") else f"> {m.gt}" for m in field.metadata
              if hasattr(m, "ge") or hasattr(m, "gt")]
    return " ".join([text, *bounds])


def _problems(err: ValidationError, kind: JudgeKind, key: str) -> list[str]:
    """Pydantic's errors as dpokit's one-line problems, each naming `key`.judge_options.OPTION and the fix."""
    fields = kind.options.model_fields
    unknown = [str(e["loc"][0]) for e in err.errors() if e["type"] == "extra_forbidden"]
    problems = []
    if unknown:
        problems.append(f"{key}.judge_options: unknown option(s) {', '.join(unknown)} for judge {kind.name!r}; "
                        f"valid: {', '.join(fields)}{_did_you_mean(unknown[0], fields) if len(unknown) == 1 else ''}")
    for e in err.errors():
        where = ".".join([f"{key}.judge_options", *map(str, e["loc"])])
        if e["type"] == "value_error":  # our own checks: the message says what is wrong and the fix
            # A check across options (loc ()) names its option first.
            problems.append(f"{where}{'.' if not e['loc'] else ': '}{e['msg'].removeprefix('Value error, ')}")
        elif e["type"] != "extra_forbidden":  # a wrong type or out of bounds
            field = fields[str(e["loc"][0])]
            example = (field.examples or [field.default])[0]
            problems.append(f"{where}: must be {_expected(field)}, got {e['input']!r}; e.g. --set {where}="
                            f"{example if isinstance(example, str) else json.dumps(example)}")
    return problems


def _validate(name, options, key: str) -> tuple[JudgeOptions | None, list[str]]:
    kind = JUDGES.get(name) if isinstance(name, str) else None
    if kind is None:
        return None, [f"{key}.judge: unknown judge {name!r}; choose one of {', '.join(JUDGES)}"
                      f"{_did_you_mean(name, JUDGES)}"]
    if options is not None and not isinstance(options, dict):
        return None, [f"{key}.judge_options: got a {type(options).__name__}; give a mapping of option: value"]
    try:
        return kind.options.model_validate(options or {}, context={"key": key}), []
    except ValidationError as err:
        return None, _problems(err, kind, key)


def check_judge(name: str, options: dict | None, key: str = "eval") -> list[str]:
    """Every problem of a judge config, each naming its config key (`key`.judge / `key`.judge_options.*) and the
    fix; [] when it is fine. Static and cheap: loads no model weights and makes no network call (a python judge's
    module is imported, as building it would). `key`: the config section, eval or pairs."""
    return _validate(name, options, key)[1]


def build_judge(name: str, options: dict | None = None, key: str = "eval"):
    """The judge `name` with `options`; the same checks as `check_judge` first, all problems in one UserError."""
    opts, problems = _validate(name, options, key)
    if problems:
        raise UserError("; ".join(problems))
    return JUDGES[name].build(opts, key)
