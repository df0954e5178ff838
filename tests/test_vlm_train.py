"""`dpokit train` on image preference data (issue 29): configs/tiny-vlm.yaml (the generated shapes set, the tiny
LLaVA-style dpokit-tiny-vlm, LoRA, sigmoid loss) end to end in a real subprocess, and the vision run's planning.
The resource planner on image data: tests/test_vlm_plan.py; evaluating vision runs: tests/test_vlm_eval.py."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.core.config import load_config
from dpokit.core.vision import load_vlm, vision_tower
from dpokit.train.vision import lora_targets

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-vlm.yaml"


def test_dpokit_train_on_the_shapes_set_with_lora(cli, tmp_path):
    run = tmp_path / "run"
    result = cli("train", CONFIG, "--set", f"output.dir={run}", "--no-eval", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "36 train rows, 12 held out" in result.stdout
    assert f"next: dpokit eval {run}" in result.stdout  # tests/test_vlm_eval.py evaluates vision runs

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    assert len(losses) == 10 and losses[0] == pytest.approx(0.6931, abs=1e-3)  # step 0: policy = reference
    assert all(torch.isfinite(torch.tensor(losses)))

    # the adapter: in the language model (and projector), none in the frozen vision tower; it moved from zero
    adapter = load_file(run / "model" / "adapter_model.safetensors")
    assert adapter and not [k for k in adapter if "vision_tower" in k]
    assert any("language_model" in k for k in adapter)
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0  # lora_B starts at zero

    # the run folder records the images by absolute path; the processor is saved with the adapter
    train = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 36 and all(Path(p).is_absolute() and Path(p).is_file() for r in train for p in r["images"])
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(run / "model").image_processor is not None
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["reference"] == "adapter" and summary["global_step"] == 10


def test_lora_targets_leave_the_frozen_vision_tower_out():
    import re

    model = load_vlm("dpokit-tiny-vlm")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    frozen = lora_targets(model, ["q_proj", "v_proj"], freeze_vision=True)
    hit = [n for n in names if re.fullmatch(frozen, n)]
    assert hit and all("language_model" in n for n in hit)
    assert lora_targets(model, ["q_proj", "v_proj"], freeze_vision=False) == ["q_proj", "v_proj"]
    assert any("vision_tower" in n and n.endswith("q_proj") for n in names)  # there was something to leave out
    assert isinstance(vision_tower(model), torch.nn.Module)


def _vision_cfg(tmp_path, **train):
    cfg = load_config(CONFIG)
    return cfg.model_copy(update={
        "output": cfg.output.model_copy(update={"dir": str(tmp_path / "run")}),
        "train": cfg.train.model_copy(update=train)})


def test_full_fine_tune_keeps_the_vision_tower_fixed(tmp_path):
    """train.freeze_vision (default true) without LoRA: the tower's weights do not move, the language model's do."""
    from dpokit.train.trainer import run_training

    cfg = _vision_cfg(tmp_path, lora=None, max_steps=2, learning_rate=1e-3)
    before = {k: v.clone() for k, v in load_vlm("dpokit-tiny-vlm").state_dict().items()}
    run_training(cfg)
    after = load_vlm(str(tmp_path / "run" / "model")).state_dict()
    tower = [k for k in after if "vision_tower" in k]
    moved = [k for k in after if "language_model" in k and not torch.equal(after[k], before[k])]
    assert tower and all(torch.equal(after[k], before[k]) for k in tower)
    assert moved


@pytest.mark.parametrize("update, needle", [
    ({"engine": "trl"}, "train.engine: trl is not wired for image data"),
    ({"reference_model": "dpokit-tiny-vlm"}, "train.reference_model: a separate reference model is not wired"),
])
def test_vision_plan_refuses_what_is_not_wired(tmp_path, update, needle):
    from dpokit.core.errors import UserError
    from dpokit.train.plan import plan_training

    with pytest.raises(UserError, match=needle):
        plan_training(_vision_cfg(tmp_path, **update))


def test_bad_image_inputs_to_dpokit_train_exit_2_with_one_line_and_nothing_written(cli, capfd, tmp_path):
    """Each before any weights load: a missing image (file and row named), image data with a text-only model, a
    model folder whose processor has no image processor. The first in a real process, the others through the CLI's
    entry point in this one (the same code without a fresh interpreter each)."""
    import shutil

    from PIL import Image

    from conftest import run_main
    from dpokit.core.vision import resolve_vlm_path

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "images" / "ok.png")
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
           "chosen": "A red square.", "rejected": "A blue circle."}
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(dict(row, images=[f"images/{n}.png"])) + "\n" for n in ("ok", "ok", "nope")))
    no_image_processor = tmp_path / "no-image-processor"
    no_image_processor.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        shutil.copy(Path(resolve_vlm_path("dpokit-tiny-vlm")) / name, no_image_processor / name)
    run = tmp_path / "run"
    cases = [
        ((f"data.source={data}",), [f"{data}:3", "'images/nope.png' not found", "relative to the data file"]),
        ((f"data.source={ROOT / 'configs/data/shapes/shapes_prefs.jsonl'}", "model.name_or_path=dpokit-tiny-llama"),
         ["shapes_prefs.jsonl:1", "text-only model", "vision-language model"]),
        ((f"model.name_or_path={no_image_processor}",), ["has no image processor", "with its processor"]),
    ]
    for i, (sets, needles) in enumerate(cases):
        args = [a for s in (*sets, f"output.dir={run}") for a in ("--set", s)]
        result = (cli("train", CONFIG, *args, env={"OMP_NUM_THREADS": "1"}) if i == 0
                  else run_main(capfd, "train", CONFIG, *args))
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and all(n in lines[0] for n in needles), lines
        assert not run.exists()


def test_resumed_vision_run_matches_the_straight_one(tmp_path):
    """6 LoRA steps straight == 3 steps, stop, resume from checkpoint-3 for the last 3 (adapter, loss)."""
    from conftest import StopAt
    from dpokit.train.trainer import run_training

    def cfg(name):
        return _vision_cfg(tmp_path / name, max_steps=6, save_steps=3, batch_size=4, seed=3)

    run_training(cfg("straight"))
    run_training(cfg("split"), callbacks=[StopAt(3)])
    assert (tmp_path / "split" / "run" / "checkpoints" / "checkpoint-3").is_dir()
    run_training(cfg("split"), resume=True)
    assert json.loads((tmp_path / "split" / "run" / "train_summary.json").read_text())["resumed_from"] == "checkpoint-3"
    a, b = (load_file(tmp_path / n / "run" / "model" / "adapter_model.safetensors") for n in ("straight", "split"))
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    loss = [[r for r in map(json.loads, (tmp_path / n / "run" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r][-1] for n in ("straight", "split")]
    assert loss[0]["step"] == loss[1]["step"] == 6 and loss[1]["loss"] == pytest.approx(loss[0]["loss"], abs=1e-6)


@pytest.mark.slow
def test_two_process_ddp_on_image_pairs_matches_one_process(tmp_path):
    """DDP (two gloo processes through `accelerate launch`, the shipped config) on the shapes set: each rank packs
    its half of the batch with its images, and the losses and margins equal one process with the same global
    batch (8 pairs per step in both)."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import CONFIGS, run_cli

    raw = yaml.safe_load(CONFIG.read_text())
    raw["data"]["source"] = str((CONFIG.parent / raw["data"]["source"]).resolve())
    steps = {"max_steps": 3, "logging_steps": 1, "save_steps": 100}
    for name, batch in (("single", 8), ("ddp", 4)):
        cfg = {**raw, "train": {**raw["train"], **steps, "batch_size": batch},
               "eval": {"enabled": False}, "output": {"dir": str(tmp_path / name)}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate" / "ddp.yaml"),
           "--num_processes", "2", "--main_process_port", "0", "-m", "dpokit", "train", str(tmp_path / "ddp.yaml")]
    ddp = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli("train", tmp_path / "single.yaml")
    assert single.returncode == 0, single.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert (summary["distributed"]["type"], summary["distributed"]["processes"]) == ("ddp", 2)

    def logged(run):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    a, b = logged(tmp_path / "single"), logged(tmp_path / "ddp")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert abs(ra[key] - rb[key]) <= 1e-4, (ra["step"], key, ra[key], rb[key])
