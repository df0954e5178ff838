"""`dpokit eval RUN_DIR --export FORMAT FILE`: the tuned model's answers in the files the field's leaderboard tools
read, so a run can be scored by AlpacaEval or Arena-Hard besides dpokit's own judge.

- `alpaca_eval`: `model_outputs.json`, a JSON list of `{"instruction", "output", "generator"}` (what
  `alpaca_eval --model_outputs FILE` reads).
- `arena_hard`: an answer JSONL, one line per question, `{"question_id", "answer_id", "model_id", "choices":
  [{"index": 0, "turns": [{"content"}]}], "tstamp"}` (arena-hard-auto's `model_answer/MODEL.jsonl`).

The prompts are the run's distinct held-out prompts, or a `--prompts` file: dpokit's own (.txt, one a line; .jsonl
with `prompt`), AlpacaEval's evaluation set (.json or .jsonl with `instruction`) or Arena-Hard's `question.jsonl`
(`question_id` and `turns`, whose ids are kept). Answers use the run's `eval` decoding settings, one per prompt.
Every input is checked before a model loads; an existing FILE is replaced only with `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text
from dpokit.core.models import load_model, load_model_and_tokenizer, load_tokenizer
from dpokit.core.run import RunDir
from dpokit.core.sampling import sample
from dpokit.core.templates import setup_chat_template
from dpokit.data.generate import read_prompts

FORMATS = ("alpaca_eval", "arena_hard")


@dataclass
class Question:
    prompt: str | list[dict]   # what the model is asked (a string, or chat messages)
    instruction: str           # the prompt as text, for the export
    question_id: str


def _text(prompt: str | list[dict]) -> str:
    """The prompt as one string: itself, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def _qid(prompt) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def _question(row, where: str) -> Question:
    if isinstance(row, dict) and "prompt" not in row:
        if isinstance(row.get("turns"), list) and row["turns"] and "question_id" in row:  # Arena-Hard question.jsonl
            content = row["turns"][0].get("content") if isinstance(row["turns"][0], dict) else None
            if isinstance(content, str) and content.strip():
                return Question(content, content, str(row["question_id"]))
        if isinstance(row.get("instruction"), str) and row["instruction"].strip():  # AlpacaEval's evaluation set
            return Question(row["instruction"], row["instruction"], _qid(row["instruction"]))
    raise UserError(f"{where}: expected 'prompt', 'instruction' (AlpacaEval) or 'question_id' and 'turns' "
                    "(Arena-Hard); fix that row or pass a dpokit prompts file (.txt or .jsonl with 'prompt')")


def read_questions(path: str | os.PathLike) -> list[Question]:
    """Questions of a --prompts file (module docstring); a bad file is a one-line UserError naming it."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UserError(f"--prompts: {path} not found; give a .txt, .jsonl or AlpacaEval .json file")
    if path.suffix.lower() in (".json", ".jsonl"):
        try:
            text = path.read_text(encoding="utf-8")
            rows = json.loads(text) if path.suffix.lower() == ".json" else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"--prompts: {path}: not valid JSON ({err}); fix the file") from None
        if not isinstance(rows, list) or not rows:
            raise UserError(f"--prompts: {path}: expected a non-empty list of rows")
        if all(isinstance(r, dict) and "prompt" not in r for r in rows):
            return [_question(r, f"--prompts: {path}: row {i + 1}") for i, r in enumerate(rows)]
    prompts = read_prompts(path)
    if not prompts:
        raise UserError(f"--prompts: {path}: no prompts in the file")
    return [Question(p, _text(p), _qid(p)) for p in prompts]


def held_out_questions(run: RunDir) -> list[Question]:
    seen, out = set(), []
    for row in run.read_eval_pairs():
        key = _qid(row["prompt"])
        if key not in seen:
            seen.add(key)
            out.append(Question(row["prompt"], _text(row["prompt"]), key))
    if not out:
        raise UserError(f"{run.path}: no held-out prompts in {run.eval_pairs}; pass --prompts FILE")
    return out


def check_export(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike, overwrite: bool) -> Path:
    """The export's output path, after every check that needs no model (format, run folder, FILE)."""
    if fmt not in FORMATS:
        raise UserError(f"--export: unknown format {fmt!r}; use one of {', '.join(FORMATS)} (--export FORMAT FILE)")
    RunDir(run_dir).require_model()
    path = Path(os.path.expanduser(str(out)))
    if path.is_dir():
        raise UserError(f"--export: {path} is a folder; give a file name, e.g. {path / 'model_outputs.json'}")
    if path.exists() and not overwrite:
        raise UserError(f"--export: {path} exists; pass --overwrite to replace it, or choose another file")
    if not path.parent.is_dir():
        raise UserError(f"--export: folder {path.parent} does not exist; create it first")
    return path


def _load_tuned(run: RunDir):
    cfg = run.read_config()
    if run.is_adapter():
        base, tokenizer = load_model_and_tokenizer(cfg.model)
        model = PeftModel.from_pretrained(base, str(run.model_dir))
    else:  # the saved folder holds the tokenizer with the chat template used in training
        model, tokenizer = load_model(str(run.model_dir), dtype=cfg.model.dtype), load_tokenizer(str(run.model_dir))
    setup_chat_template(tokenizer, cfg.data.chat_template)
    return cfg, model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def records(fmt: str, questions: list[Question], answers: list[str], generator: str) -> str:
    """The export file's text."""
    if fmt == "alpaca_eval":
        rows = [{"instruction": q.instruction, "output": a, "generator": generator}
                for q, a in zip(questions, answers, strict=True)]
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    now = time.time()
    lines = []
    for q, a in zip(questions, answers, strict=True):
        answer_id = hashlib.sha256(f"{generator}\0{q.question_id}\0{a}".encode()).hexdigest()[:22]
        lines.append(json.dumps({"question_id": q.question_id, "answer_id": answer_id, "model_id": generator,
                                 "choices": [{"index": 0, "turns": [{"content": a}]}], "tstamp": now},
                                ensure_ascii=False))
    return "\n".join(lines) + "\n"


def export_answers(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike, *, prompts: str | None = None,
                   overwrite: bool = False, generator: str | None = None) -> Path:
    """Answer the held-out prompts (or `prompts`) with the tuned model and write them as `fmt` to `out`."""
    path = check_export(run_dir, fmt, out, overwrite)
    run = RunDir(run_dir)
    held_out = run.read_eval_pairs()
    if held_out and "images" in held_out[0]:  # before any model loads: the leaderboards' prompts are text
        raise UserError(f"--export: {run.path} is a vision-language run; alpaca_eval and arena_hard ask text "
                        "questions and dpokit's sampler for them is text-only; evaluate it with dpokit eval instead")
    questions = read_questions(prompts) if prompts else held_out_questions(run)
    generator = generator or run.path.resolve().name
    cfg, model, tokenizer = _load_tuned(run)
    e = cfg.eval
    got = sample(model, tokenizer, [q.prompt for q in questions], num_samples=1, max_new_tokens=e.max_new_tokens,
                 temperature=e.temperature, top_p=e.top_p, seed=e.seed, batch_size=e.gen_batch_size,
                 system_prompt=cfg.data.system_prompt, engine=e.engine)
    atomic_write_text(path, records(fmt, questions, [per[0].text for per in got], generator))
    return path


__all__ = ["FORMATS", "export_answers", "read_questions", "records"]
