"""The docs run as written: every command in README.md, CONTRIBUTING.md and docs/*.md, in order, in one fresh folder
(slow).

The convention the docs follow (CONTRIBUTING.md, "The docs walkthrough", says it in short):

- Shell commands live in ```bash fenced blocks. Each command is one line, or several joined by a trailing
  backslash; comment lines are not commands. ```python blocks are scripts and run too (`python` in a subprocess,
  same folder). Any other fence (```text, ```yaml, a bare ```) is output or file content and never runs, except
  one whose first line is `# file: NAME` (a ```yaml block a reader would save as NAME): the block, that line
  included, is written to NAME in the folder, so the commands after it can use the file.
- A command that cannot run offline on a 2-core CPU ends with a comment naming what it needs, `# needs: WHAT`
  (other words may come first in the same comment: `# the notebook's preprocessing; needs: hub`), and is skipped.
  WHAT is one of NEEDS below. A python block whose first line is such a comment is skipped whole.
- `# template` marks an illustrative command with placeholders (RUN_DIR, CONFIG); skipped. Prefer a runnable
  command.
- `pip install ...` lines are skipped (CI installed the package first, with the README's own Install command), and
  so are `python -m pytest` lines (this test runs inside the test suite).

The test copies the checkout (tracked and untracked, not ignored, files: what a fresh clone holds) into a fresh
folder and runs README.md, then CONTRIBUTING.md, then docs/*.md by name, all in that one folder, as a user reading them top to bottom
would: a doc must not collide with what an earlier one wrote. Each command runs by itself in
`bash -c 'set -euo pipefail; COMMAND'` with the test session's environment (conftest.py: a fresh DPOKIT_CACHE,
HF_HUB_OFFLINE=1; CI also gives an empty HOME). Every command's wall time is printed as it finishes; a failure
reports each failed command with its output tail.

The two long generation commands, `dpokit quickstart` (about 13 minutes on a 2-core CPU without native bf16, from
a cold cache) and `dpokit data generate` (all 330 bundled prompts x 8 answers), run on fewer prompts through the
documented `--set` keys in SHORTEN below (`pairs.num_prompts`, `pairs.eval_prompts`, `eval.num_prompts`: see
docs/quickstart.md and `dpokit config-keys`), so the walkthrough stays under 30 minutes; the printed command says
so. DPOKIT_DOCS_FULL=1 runs them exactly as written. DPOKIT_DOCS_TIMEOUT sets the limit per command (seconds).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NEEDS = {
    "hub": "downloads from the Hugging Face hub (internet)",
    "gpu": "a CUDA GPU",
    "multi-process": "more processes than a 2-core CPU runs in reasonable time",
    "multi-node": "several machines",
    "server": "a running server (e.g. an OpenAI-compatible judge endpoint)",
    "long": "many minutes (a benchmark, a multi-round pipeline); run it by hand",
    "interactive": "a person at a browser (e.g. `dpokit label serve` blocks until stopped)",
}
# Commands the docs already document how to shorten; appended unless DPOKIT_DOCS_FULL=1 (see module docstring).
SHORTEN = {
    "dpokit quickstart": "--set pairs.num_prompts=48 --set pairs.eval_prompts=16 --set eval.num_prompts=16",
    "dpokit data generate": "--set pairs.num_prompts=24",
}
SKIP_PREFIXES = {"pip install": "CI installs the package first", "python -m pytest": "the test suite itself"}
COMMAND_TIMEOUT = int(os.environ.get("DPOKIT_DOCS_TIMEOUT", "1800"))   # seconds per command


@dataclass
class Command:
    doc: str
    line: int           # 1-based line of the command's first line in the doc
    kind: str           # "bash", "python" or "file"
    text: str           # what runs (continuations joined for bash), or the file's content
    skip: str | None    # why it is skipped, or None
    path: str | None = None   # kind "file": where the content is written, relative to the folder


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a bash line: the comment starts at an unquoted '#' at the start or after whitespace."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


_FILE_RE = re.compile(r"^#\s*file:\s*(\S+)\s*$")
_NEEDS_RE = re.compile(r"\bneeds:\s*([a-z-]+(?:\s*,\s*[a-z-]+)*)")


def _skip_reason(comment: str) -> str | None:
    """`needs: X[, Y]` or `template` in a comment -> why the command is skipped; unknown needs are an error."""
    found = _NEEDS_RE.search(comment)
    if found:
        needs = [w.strip() for w in found.group(1).split(",")]
        unknown = [w for w in needs if w not in NEEDS]
        if unknown:
            raise ValueError(f"unknown `needs: {', '.join(unknown)}`; known: {', '.join(NEEDS)}")
        return "needs " + ", ".join(needs)
    if re.search(r"(^|[;,]\s*)template\b", comment):
        return "template"
    return None


def extract_commands(path: Path) -> list[Command]:
    """Every command of one Markdown file, in order, with its skip reason (see the module docstring)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, lang = len(fence.group(1)), fence.group(2)
        start = i + 1
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            i += 1
        # The fence's own indentation comes off every line; the code's own indentation stays (YAML, python).
        body = [line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines[start:i]]
        i += 1
        if lang == "python":
            first = next((b for b in body if b.strip()), "")
            skip = _skip_reason(first.strip().lstrip("#")) if first.lstrip().startswith("#") else None
            commands.append(Command(path.name, start, "python", "\n".join(body) + "\n", skip))
        elif lang in ("bash", "sh", "shell"):
            commands.extend(_bash_commands(path.name, body, start))
        elif body and (named := _FILE_RE.match(body[0].strip())):
            commands.append(Command(path.name, start, "file", "\n".join(body) + "\n", None, named.group(1)))
    return commands


def _bash_commands(doc: str, body: list[str], first_line: int) -> list[Command]:
    out = []
    j = 0
    while j < len(body):
        if not body[j].strip() or body[j].lstrip().startswith("#"):
            j += 1
            continue
        start, parts, comments = j, [], []
        while True:
            code, comment = _split_comment(body[j])
            if comment:
                comments.append(comment)
            if code.endswith("\\") and j + 1 < len(body):
                parts.append(code[:-1].rstrip())
                j += 1
                continue
            parts.append(code)
            j += 1
            break
        text = " ".join(p.strip() for p in parts)
        skip = next(filter(None, (_skip_reason(c) for c in comments)), None)
        for prefix, why in SKIP_PREFIXES.items():
            if skip is None and text.startswith(prefix):
                skip = f"`{prefix}`: {why}"
        out.append(Command(doc, first_line + start + 1, "bash", text, skip))
    return out


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def fresh_checkout(dest: Path) -> Path:
    """Copy what a fresh clone of this checkout holds (plus untracked, not ignored, files) into dest."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = None
    if listed is None:   # not a git checkout: the tree minus what .gitignore names
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "runs", "build", "dist", ".venv",
            ".import_linter_cache", "*.pyc"))
        return dest
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def shortened(cmd: Command) -> str:
    if cmd.kind != "bash" or os.environ.get("DPOKIT_DOCS_FULL") == "1":
        return cmd.text
    for prefix, extra in SHORTEN.items():
        if cmd.text == prefix or cmd.text.startswith(prefix + " "):
            return f"{cmd.text} {extra}"
    return cmd.text


def run_command(cmd: Command, cwd: Path, scratch: Path) -> tuple[int, str, float, float]:
    """(exit code, output, wall seconds, CPU seconds) of one command run in cwd."""
    if cmd.kind == "file":
        target = (cwd / cmd.path).resolve()
        if not target.is_relative_to(cwd.resolve()):
            return 1, f"`# file: {cmd.path}` is outside the folder", 0.0, 0.0
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(cmd.text, encoding="utf-8")
        return 0, "", 0.0, 0.0
    if cmd.kind == "python":
        script = scratch / f"{Path(cmd.doc).stem}-{cmd.line}.py"
        script.write_text(cmd.text, encoding="utf-8")
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-c", "set -euo pipefail\n" + shortened(cmd)]
    began, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                             stdin=subprocess.DEVNULL)
        code, output = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as err:
        code, output = -1, f"timed out after {COMMAND_TIMEOUT} s\n{err.stdout or ''}{err.stderr or ''}"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    return code, output, time.perf_counter() - began, cpu_seconds


def test_extractor_reads_markers(tmp_path):
    """Fast: the convention itself (markers, continuations, skipped prefixes, fences that never run)."""
    doc = tmp_path / "sample.md"
    doc.write_text("\n".join([
        "```bash",
        "pip install -e .",
        "# a comment line",
        "dpokit train a.yaml --set x=1 \\",
        "    --set y=2   # trains; needs: hub",
        "echo '# not a comment' && echo ok   # fine",
        "dpokit eval RUN_DIR   # template",
        "```",
        "```text",
        "dpokit never runs",
        "```",
        "```python",
        "# needs: gpu",
        "print(1)",
        "```",
        "```yaml",
        "# file: conf/run.yaml",
        "model:",
        "  name_or_path: x",
        "```",
        "```yaml",
        "# only shown",
        "```",
    ]) + "\n", encoding="utf-8")
    cmds = extract_commands(doc)
    assert [(c.kind, c.text, c.skip) for c in cmds] == [
        ("bash", "pip install -e .", "`pip install`: CI installs the package first"),
        ("bash", "dpokit train a.yaml --set x=1 --set y=2", "needs hub"),
        ("bash", "echo '# not a comment' && echo ok", None),
        ("bash", "dpokit eval RUN_DIR", "template"),
        ("python", "# needs: gpu\nprint(1)\n", "needs gpu"),
        ("file", "# file: conf/run.yaml\nmodel:\n  name_or_path: x\n", None),
    ]
    assert [c.line for c in cmds][:3] == [2, 4, 6]
    assert cmds[-1].path == "conf/run.yaml"
    code, _, _, _ = run_command(cmds[-1], tmp_path, tmp_path)
    assert code == 0 and (tmp_path / "conf" / "run.yaml").read_text() == cmds[-1].text


def test_every_doc_command_is_extractable():
    """Fast: every doc parses, every `needs:` is known, and no command keeps a capitalised placeholder unmarked."""
    for path in doc_files():
        for cmd in extract_commands(path):
            if cmd.skip is None and cmd.kind == "bash":
                placeholder = re.search(r"\b(RUN_DIR|CONFIG|FILE|DIR|KEY|VALUE)\b", cmd.text)
                assert not placeholder, (f"{cmd.doc}:{cmd.line}: `{cmd.text}` has the placeholder "
                                         f"{placeholder.group(0)}; make it runnable or mark it `# template`")


@pytest.mark.slow
def test_docs_walkthrough(tmp_path, capsys):
    work = fresh_checkout(tmp_path / "fresh")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    results, failures = [], []
    total, cpu = time.perf_counter(), 0.0
    for path in doc_files():
        for cmd in extract_commands(path):
            where = f"{cmd.doc}:{cmd.line}"
            shown = (cmd.text if cmd.kind == "bash" else f"writes {cmd.path}" if cmd.kind == "file"
                     else f"python block ({cmd.text.count(chr(10))} lines)")
            if cmd.skip:
                results.append((where, "skip", 0.0, shown, cmd.skip))
                with capsys.disabled():
                    print(f"\n[docs] {where:<26} skipped ({cmd.skip}): {shown}", flush=True)
                continue
            ran = shortened(cmd) if cmd.kind == "bash" else shown
            code, output, seconds, cpu_seconds = run_command(cmd, work, scratch)
            cpu += cpu_seconds
            status = "ok" if code == 0 else f"FAILED (exit {code})"
            results.append((where, status, seconds, ran, None))
            with capsys.disabled():
                print(f"\n[docs] {where:<26} {seconds:7.1f} s (cpu {cpu_seconds:6.1f} s)  {status}: {ran}", flush=True)
            if code != 0:
                failures.append(f"{where}: `{ran}` exited {code}; last output:\n{output[-4000:]}")
    total = time.perf_counter() - total
    with capsys.disabled():
        print(f"\n[docs] walkthrough: {sum(r[1] == 'ok' for r in results)} ok, {len(failures)} failed, "
              f"{sum(r[1] == 'skip' for r in results)} skipped, {total:.0f} s in all (cpu {cpu:.0f} s)", flush=True)
    assert not failures, f"{len(failures)} doc command(s) failed (the first may cause the rest):\n\n" + \
        "\n\n".join(failures)


def _train_output_dir(cmd: Command, written: dict[str, str]) -> str | None:
    """The run folder a `dpokit train CONFIG ...` command writes: its `--set output.dir=` or the config's output.dir
    (the config read from the checkout or from an earlier `# file:` block)."""
    import shlex

    import yaml

    words = shlex.split(cmd.text.split("&&")[0].split("|")[0])
    if words[:2] != ["dpokit", "train"] or len(words) < 3:
        return None
    for i, word in enumerate(words):
        value = words[i + 1] if word == "--set" and i + 1 < len(words) else ""
        if value.startswith("output.dir="):
            return value.split("=", 1)[1]
    config = words[2]
    text = written.get(config) or ((ROOT / config).read_text(encoding="utf-8") if (ROOT / config).is_file() else None)
    if text is None:
        return None
    return ((yaml.safe_load(text) or {}).get("output") or {}).get("dir")


def test_doc_trainings_do_not_collide():
    """Fast: two `dpokit train` commands of the walkthrough (README, CONTRIBUTING, docs/ in that order, one folder)
    never write the same run folder unless the later one says `--overwrite` or `--resume`. The slow walkthrough
    would stop there at exit 2 ("already exists"), 40 minutes into CI."""
    written: dict[str, str] = {}
    first_use: dict[str, str] = {}
    clashes = []
    for path in doc_files():
        for cmd in extract_commands(path):
            if cmd.kind == "file":
                written[cmd.path] = cmd.text
            if cmd.skip or cmd.kind != "bash":
                continue
            out = _train_output_dir(cmd, written)
            if out is None:
                continue
            where = f"{cmd.doc}:{cmd.line}"
            if out in first_use and not re.search(r"--(overwrite|resume)\b", cmd.text):
                clashes.append(f"{where}: `{cmd.text}` writes {out}, which {first_use[out]} already wrote; "
                               "give it its own `--set output.dir=...` (or --overwrite)")
            first_use.setdefault(out, where)
    assert not clashes, "\n".join(clashes)
    assert "runs/tiny" in first_use   # the README's own training was found (the parser reads the docs at all)
