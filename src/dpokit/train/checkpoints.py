"""The run's checkpoint folders, read without torch or transformers (`dpokit plan` and the pipelines ask whether a
run can resume; importing transformers' Trainer costs seconds, peft and bitsandbytes included).

- `last_complete_checkpoint()`: what `--resume` continues from (only renamed, complete checkpoints; see
  `dpokit.train.resilience.AtomicCheckpointMixin`, which writes them).
- `checkpoint_step()`: the optimizer step a checkpoint was saved at.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

STAGING = ".staging"
TRAINER_STATE = "trainer_state.json"  # Trainer writes it last, so its presence marks a finished save
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The highest-step `checkpoint-N` folder holding a trainer state; staging folders and partial saves are ignored."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = []
    for child in ckpt_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return str(max(found)[1]) if found else None


def checkpoint_step(checkpoint: str) -> int:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))["global_step"]
