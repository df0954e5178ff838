"""The pieces `dpokit quickstart`, `dpokit iterate` and `dpokit sweep` share, so each of them reads as a short list
of calls: the bundled config they start from, the output folder they own, on-policy pair sampling with its
progress bar, "train unless finished" and "evaluate unless done", and the one text-table renderer.

Below the pipelines and above the stages (data, train, eval, report): it calls the stages' entry functions and
owns no artifact of its own beyond the folder marker.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from dpokit.core.config import RunConfig, load_config, read_config_file
from dpokit.core.errors import UserError
from dpokit.core.io import atomic_write_text
from dpokit.core.run import RunDir
from dpokit.train.checkpoints import last_complete_checkpoint
from dpokit.train.plan import plan_training

INPUTS_STAMP = ".dpokit-inputs"  # in a run folder: the hash of the pairs it was trained on


def bundled_config_path(name: str) -> Path:
    """configs/NAME of a source checkout, else the copy shipped in the package (dpokit/assets/NAME)."""
    repo_copy = Path(__file__).resolve().parents[2] / "configs" / name
    return repo_copy if repo_copy.is_file() else Path(__file__).resolve().parent / "assets" / name


def load_generating_config(path: str | Path | None, bundled: str, command: str, placeholder: str,
                           overrides: list[str] | None = None) -> RunConfig:
    """The run config of a pipeline that samples its own pairs (quickstart, iterate): `data.source` is filled in
    later, so a config that sets it is refused (one line naming the file and the fix)."""
    path = Path(path) if path else bundled_config_path(bundled)
    if path.is_file() and (read_config_file(path).get("data") or {}).get("source"):
        raise UserError(f"{path}: data.source: dpokit {command} samples its own pairs; remove data.source (the "
                        "prompts are pairs.prompts; to train on your own pairs use `dpokit train CONFIG`)")
    return load_config(path, [f"data.source={placeholder}", *(overrides or [])])


def claim_out_dir(out: Path, command: str, *, fresh: bool, check_only: bool = False) -> None:
    """OUT belongs to `dpokit COMMAND`: a folder it did not create (no marker) and is not empty is refused, a file
    too; `fresh` empties a folder it did create. `check_only`: only the checks (before anything is loaded)."""
    marker = out / f".dpokit-{command}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise UserError(f"--out: {out} exists and was not written by dpokit {command}; choose another --out or "
                        "empty it")
    if check_only:
        return
    if fresh and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()


@contextmanager
def sampling_progress(console, description: str, total: int, transient: bool = False):
    """A rich progress bar for sampling answers; yields `advance(n)`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=transient) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def sample_best_vs_worst(cfg: RunConfig, prompts: list, console, description: str, *, adapter: Path | None = None,
                         transient: bool = False) -> tuple[list[dict], dict, object]:
    """On-policy pairs: `cfg.pairs.num_samples` answers per prompt from the model (plus a LoRA adapter, merged
    for sampling), judged, best vs worst kept (dpokit.data.generate). Returns (pairs, stats, the tokenizer with
    its chat template set up), so callers need not load it again."""
    from dpokit.core.models import load_model_and_tokenizer
    from dpokit.core.templates import setup_chat_template
    from dpokit.data.generate import generate_pairs, pair_settings

    settings = pair_settings(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    setup_chat_template(tokenizer, cfg.data.chat_template)
    if adapter is not None:  # merged for sampling only: the same policy, without the adapter's extra matmuls
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    with sampling_progress(console, f"{description} ({settings['dtype']})", len(prompts) * cfg.pairs.num_samples,
                           transient) as advance:
        # generate_pairs casts the model to the sampling dtype: no gradients, so bf16 is safe where it is fast.
        pairs, stats = generate_pairs(model, tokenizer, prompts, cfg.pairs, **settings, progress=advance)
    del model
    return pairs, stats, tokenizer


def inputs_key(cfg: RunConfig) -> str:
    """Hash of the pairs a run trains and evaluates on (the files' bytes), so a run folder is reused only for the
    very pairs it saw, even when the file names stay the same between runs."""
    h = hashlib.sha256()
    for source in (cfg.data.source, cfg.data.eval_source):
        if source and Path(source).is_file():
            h.update(Path(source).read_bytes())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def train_unless_finished(cfg: RunConfig, *, progress: bool = False, callbacks: list | None = None,
                          refresh_reference: bool = False, say: Callable[[str], None] = print) -> tuple[RunDir, bool]:
    """Train into cfg.output.dir unless it holds a finished run of this config on these pairs; resume from its
    last checkpoint when it has one of them; otherwise start over (cfg.output.overwrite). Returns the run folder
    and whether it trained now."""
    from dpokit.train.trainer import run_training

    run = RunDir(cfg.output.dir)
    key = inputs_key(cfg)
    stamp = run.path / INPUTS_STAMP
    # The iterate section is a record there (dpokit train ignores it); iterate.rounds may grow between runs.
    same = (run.config.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == key
            and run.read_config().model_copy(update={"iterate": cfg.iterate}) == cfg)
    if same and run.has_model() and run.read_train_summary() is not None:
        say(f"reusing the finished run in {run.path}")
        return run, False
    resume = same and last_complete_checkpoint(run.checkpoints) is not None
    say(f"training{' (resuming ' + run.path.name + ' from its checkpoint)' if resume else ''}")
    run_training(plan_training(cfg, resume=resume, evaluate=True), progress=progress,
                 callbacks=[_stamp_inputs_callback(stamp, key), *(callbacks or [])],
                 refresh_reference=refresh_reference)
    return run, True


def _stamp_inputs_callback(stamp: Path, key: str):
    """Writes the inputs' hash into the run folder when training begins (the folder exists by then, recreated
    under --overwrite), so a run killed before its end is resumed, not restarted, on the same pairs."""
    from transformers import TrainerCallback

    class StampInputs(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                atomic_write_text(stamp, key)

    return StampInputs()


def evaluate_unless_done(run: RunDir, *, trained_now: bool, quiet: bool = True,
                         say: Callable[[str], None] = print) -> None:
    """`dpokit eval` of the run, unless its eval.json is already there for this very training."""
    from dpokit.eval import evaluate_run

    if trained_now or run.read_eval() is None:
        say("evaluating on the held-out prompts")
        evaluate_run(run.path, quiet=quiet)


def render_table(header: list[str], rows: list[list[str]], title: str | None = None) -> str:
    """Plain-text table (rich, no colour, no box), the same renderer for every pipeline's closing table."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=10_000, color_system=None, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())
