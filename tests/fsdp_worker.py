"""Launched by tests/test_fsdp.py under `accelerate launch` (not collected by pytest): trains CONFIG with dpokit's
`run_training`, like `dpokit train CONFIG`, and writes OUT_DIR/rank<R>.json when training starts: for every
parameter of the prepared (wrapped) model, the elements this rank holds and the elements of the full parameter.

    accelerate launch --config_file configs/accelerate/fsdp.yaml tests/fsdp_worker.py CONFIG OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

from dpokit.core.config import load_config
from dpokit.train.trainer import run_training


class RecordShards(TrainerCallback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        held = {}
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: a DTensor, this rank's shard
            held[name] = [local.numel(), p.numel(), type(p).__name__]
        rank = int(os.environ.get("RANK", "0"))
        (self.out / f"rank{rank}.json").write_text(json.dumps(held))


if __name__ == "__main__":
    config, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    run_training(load_config(config), callbacks=[RecordShards(out)])
