"""Training on vision preference data (issue 29): what `dpokit train` does differently when the rows carry images.

The data (`dpokit.data.vision`: TRL's vision format or RLAIF-V, every check before weights load) goes through the
model's processor; each pair is laid out once, `[prompt with image tokens, chosen, rejected]`, with its images
encoded once (`dpokit.core.vision.pack_vision_pairs`); the loss is the same `DPOTrainer.compute_loss` as for text.
`train.freeze_vision` (default true) keeps the vision tower's weights fixed: with LoRA no adapter goes into it, and
the reference forward reuses the policy's image encodes of the batch (`dpokit.core.vision.share_frozen_tower`).

The evaluation after training (eval.enabled) and `dpokit eval` work on vision runs (`dpokit.eval.vision`): held-out
preference accuracy, answers generated from the held-out images, judges that see the images; planning refuses the
judges that read text only (reward-model, llm) with the fix.

Not yet for vision runs (each refused at planning with the fix): train.engine trl, train.reference_model,
ranked or unpaired feedback, a separate eval_source, and train.select best_judge (its sampler is text-only).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.core.config import RunConfig
from dpokit.core.judges import image_judge_problem
from dpokit.core.models import pick_dtype
from dpokit.core.run import (
    DataChecks,
    DataReport,
    Malformed,
    ReadCounts,
    RowChecks,
    RunDir,
    SharedPrompts,
    Split,
)
from dpokit.core.vision import load_processor, load_vlm, pack_vision_pairs, vision_tower
from dpokit.data import PreferenceData
from dpokit.data.vision import (
    check_model_takes_images,
    is_vision_source,
    load_vision_preferences,
    vision_rows,
)


def is_vision_run(cfg: RunConfig) -> bool:
    """Whether the training data carries images (a local file or folder whose first row has image columns)."""
    return is_vision_source(cfg.data.source)


def vision_plan_problems(cfg: RunConfig, evaluate: bool) -> list[str]:
    """What a vision run cannot do yet, each with the fix (planning reports them with every other problem). With
    `evaluate`, a judge of generated answers that cannot see the images is one of them."""
    problems = []
    if cfg.train.engine != "native":
        problems.append("train.engine: trl is not wired for image data; use train.engine: native")
    if cfg.train.reference_model:
        problems.append("train.reference_model: a separate reference model is not wired for image data yet (it would "
                        "load as a text-only model); unset it: the reference is the initial policy")
    if cfg.train.layout == "padded":
        problems.append("train.layout: padded: image pairs are always laid out once (the prompt and its images once, "
                        "then both answers); unset train.layout")
    if cfg.data.kind not in ("auto", "pair"):
        problems.append(f"data.kind: image data trains pairs only, not {cfg.data.kind}; use data.kind: pair")
    if cfg.data.eval_source or cfg.data.eval_split:
        problems.append("data.eval_source / data.eval_split: image data holds out data.eval_fraction of its rows; "
                        "unset them")
    if evaluate and cfg.eval.generate:
        problems += [p for p in [image_judge_problem(cfg.eval.judge)] if p]
    if cfg.train.select == "best_judge":
        problems.append("train.select: best_judge is not wired for image data (its sampler is text-only); use "
                        "train.select: last (or auto)")
    return problems


class VisionPairCollator:
    """Packed vision pairs: each pair once, its images once (dense attention over the packed rows)."""

    attention = "dense"

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, pairs: list[dict]) -> dict:
        return pack_vision_pairs(pairs, self.pad_id)


@dataclass
class VisionSetup:
    processor: object
    data: PreferenceData
    train_enc: list[dict]
    eval_enc: list[dict]
    images_to_save: list[tuple[Path, object]] = field(default_factory=list)  # (run-folder path, PIL image)


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded held-out indices (at least one when fraction > 0 and there are two rows or more)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _report(cfg: RunConfig, n_in: int, n_train: int, n_eval: int, formats: list[str]) -> DataReport:
    empty = RowChecks(empty_fields={})
    return DataReport(
        source=cfg.data.source, format="+".join(formats), kind="conversational", n_train=n_train, n_eval=n_eval,
        train_counts=ReadCounts(rows_in=n_in, malformed=Malformed(count=0, by_kind={}), dropped_by_format={},
                                identical_pairs_dropped={"count": 0}, rows_out=n_in),
        split=Split(how="by_prompt" if n_eval else "none", eval_fraction=cfg.data.eval_fraction, seed=cfg.data.seed),
        checks=DataChecks(train=empty, eval=empty,
                          prompts_shared_train_eval=SharedPrompts(eval_pairs=0, distinct_prompts=0, examples=[])),
        tokenizer=cfg.model.tokenizer or cfg.model.name_or_path)


def _record(row: dict, index: int, images_dir: Path, saves: list) -> dict:
    """A row as data/train.jsonl records it: the messages and the images' absolute paths. An image given as bytes
    or a PIL image (parquet, the API) has no path: it is saved in the run folder (data/images/, by write_run_start)
    and recorded by that path, so evaluation, the report and labelling can read it again."""
    refs = []
    for k, (ref, image) in enumerate(zip(row["image_refs"], row["images"], strict=True), start=1):
        if not Path(ref).is_absolute():
            path = images_dir / f"row-{index + 1:05d}-{k}.png"
            saves.append((path, image))
            ref = str(path)
        refs.append(ref)
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"], "images": refs}


def prepare_vision_data(cfg: RunConfig) -> VisionSetup:
    """Processor and data, every check before any weights load."""
    name = cfg.model.name_or_path
    rows = vision_rows(cfg.data.source)
    check_model_takes_images(name, rows[0][0] if rows else str(cfg.data.source))
    processor = load_processor(cfg.model.tokenizer or name, revision=cfg.model.revision,
                               trust_remote_code=cfg.model.trust_remote_code)
    loaded = load_vision_preferences(name, source=cfg.data.source, max_length=cfg.data.max_length,
                                     processor=processor)
    n = len(loaded.rows) if cfg.data.max_rows is None else min(cfg.data.max_rows, len(loaded.rows))
    train_idx, eval_idx = _split(n, cfg.data.eval_fraction, cfg.data.seed)
    if cfg.data.max_eval_rows is not None:
        eval_idx = eval_idx[:cfg.data.max_eval_rows]
    rows, enc, where = loaded.rows, loaded.encoded, loaded.locations
    images_dir, saves = RunDir(cfg.output.dir).images_dir.resolve(), []
    data = PreferenceData(train=[_record(rows[i], i, images_dir, saves) for i in train_idx],
                          eval=[_record(rows[i], i, images_dir, saves) for i in eval_idx],
                          format="+".join(loaded.formats), report=_report(cfg, n, len(train_idx), len(eval_idx),
                                                                          loaded.formats),
                          train_locations=[where[i] for i in train_idx], eval_locations=[where[i] for i in eval_idx])
    return VisionSetup(processor, data, [enc[i] for i in train_idx], [enc[i] for i in eval_idx], saves)


def lora_targets(model, target_modules, freeze_vision: bool):
    """train.lora.target_modules, with the vision tower left out when it is frozen (peft matches a string target as
    a regular expression over the whole module name)."""
    if not freeze_vision:
        return target_modules
    tower = next(name for name, module in model.named_modules() if module is vision_tower(model))
    if target_modules == "all-linear":
        linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                  if type(m).__name__ == "Linear" and not name.startswith(tower) and "lm_head" not in name}
        target_modules = sorted(linear)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return rf"^(?!{tower.replace('.', chr(92) + '.')}\.).*\.({'|'.join(names)})$"


def load_vision_model(cfg: RunConfig):
    """The policy: `AutoModelForImageTextToText`, its vision tower frozen when train.freeze_vision."""
    model = load_vlm(cfg.model.name_or_path, dtype=pick_dtype(cfg.model.dtype), revision=cfg.model.revision,
                     trust_remote_code=cfg.model.trust_remote_code)
    if cfg.train.freeze_vision:
        vision_tower(model).requires_grad_(False)
    return model
