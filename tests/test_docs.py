"""The README's config reference is the config's own help: it cannot drift from the code."""

from pathlib import Path

from dpokit.cli import describe_config
from dpokit.core.config import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_matches_config_keys():
    text = README.read_text(encoding="utf-8")
    block = text[text.index("## Config reference"):]
    block = block[block.index("```text\n") + len("```text\n"):]
    block = block[: block.index("```")]
    assert block.strip() == describe_config(RunConfig).strip(), (
        "README config reference is stale; regenerate it from `dpokit config-keys`")


def test_readme_names_every_cli_command():
    from typer.main import get_command

    from dpokit.cli import app

    text = README.read_text(encoding="utf-8")
    root = get_command(app)
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", None)
        for full in ([f"dpokit {name} {sub}" for sub in subs] if subs else [f"dpokit {name}"]):
            assert full in text, f"README does not show `{full}`"


def _generated_block(text: str, marker: str) -> str:
    block = text[text.index(marker) + len(marker):].lstrip("\n")
    return block[: block.index("\n\n")]


def test_readme_run_folder_and_eval_json_tables_match_the_artifact_models():
    from dpokit.core.run import readme_tables

    text = README.read_text(encoding="utf-8")
    tables = readme_tables()
    assert _generated_block(text, "<!-- run-folder table: generated, tests/test_docs.py -->") == tables["run_folder"]
    assert _generated_block(text, "<!-- eval.json table: generated, tests/test_docs.py -->") == tables["eval_json"]


def test_readme_loss_table_matches_the_loss_registry():
    from dpokit.train.losses import REGISTRY, loss_table_markdown

    text = README.read_text(encoding="utf-8")
    assert _generated_block(text, "<!-- loss table: generated from dpokit.train.losses.REGISTRY, tests/test_docs.py -->") \
        == loss_table_markdown()
    assert all(f"| `{name}` |" in text for name in REGISTRY)


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
