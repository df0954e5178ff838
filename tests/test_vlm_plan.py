"""`dpokit plan` on image preference data (issue 29): the vision tower and each pair's image patches in the memory
and time estimates, counted from the real model and the real encoded pairs."""

import json
from pathlib import Path

import pytest

from conftest import run_cli
from dpokit.core.config import load_config
from dpokit.train import estimate as est
from dpokit.train.resources import plan_resources

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-vlm.yaml"


def _cfg(tmp_path, **train):
    cfg = load_config(CONFIG)
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(tmp_path / "run")}),
                                  "train": cfg.train.model_copy(update=train)})


def test_vision_shape_and_lora_count_equal_the_real_model(tmp_path):
    """The meta-device count of the tower equals the loaded model's; the LoRA count with the frozen tower left out
    equals what peft trains with dpokit's own targets (`lora_targets`)."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    from dpokit.core.vision import vision_tower
    from dpokit.train.vision import load_vision_model, lora_targets

    cfg = _cfg(tmp_path)
    shape = est.model_shape(cfg, vision=True)
    model = load_vision_model(cfg)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.vision.params == sum(p.numel() for p in vision_tower(model).parameters()) > 0
    assert shape.vision.frozen and shape.vision.patch == model.config.vision_config.patch_size
    lora = cfg.train.lora
    targets = lora_targets(model, lora.target_modules, freeze_vision=True)
    peft_model = get_peft_model(model, PeftLora(r=lora.r, lora_alpha=lora.alpha, target_modules=targets))
    assert shape.lora_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_image_patches_and_tokens_come_from_the_encoded_pairs(tmp_path):
    """Each pair's tower positions are its pixel values' patches (LLaVA: 32x32 images, 8-pixel patches: 16 per
    image), and the packed rows are as wide as the prompt with its expanded image tokens plus both answers."""
    from dpokit.core.packing import pair_length
    from dpokit.train.vision import prepare_vision_data

    cfg = _cfg(tmp_path)
    shape = est.model_shape(cfg, vision=True)
    lengths = est.data_lengths(cfg, shape.vision)
    encoded = prepare_vision_data(cfg).train_enc
    assert lengths.vision == [16 * len(p["pixel_values"]) for p in encoded]
    assert lengths.pair == [pair_length(p) for p in encoded]
    assert min(lengths.pair) > 16  # image tokens are in the rows


def test_the_tower_in_memory_and_time_follows_freeze_vision(tmp_path):
    """A frozen tower (the default) trains nothing and keeps no activations: one forward per patch. Unfrozen, its
    weights train (full fine-tune), its activations are kept and its backward costs twice its forward."""
    frozen_cfg, open_cfg = _cfg(tmp_path, lora=None), _cfg(tmp_path, lora=None, freeze_vision=False)
    frozen, opened = plan_resources(frozen_cfg), plan_resources(open_cfg)
    tower = frozen.settings["vision_params"]
    assert frozen.settings["trainable_params"] == frozen.settings["params"] - tower
    assert opened.settings["trainable_params"] == opened.settings["params"]
    assert "vision_activations" not in frozen.breakdown_mb and opened.breakdown_mb["vision_activations"] > 0
    patches = frozen.settings["vision_patches_per_epoch"]
    assert patches == 16 * frozen.settings["pairs"]  # one 32x32 image per pair, encoded once (packed layout)
    # policy: forward (+ backward when trained); reference (the separate base copy): one more forward
    extra = opened.time["flops_per_epoch"] - frozen.time["flops_per_epoch"]
    assert extra == pytest.approx(2 * (2 * tower * patches), rel=1e-9)


def test_padded_layout_is_refused_for_image_data(tmp_path):
    """Image pairs are always laid out once: a padded layout would be silently ignored, so planning says so."""
    from dpokit.core.errors import UserError

    with pytest.raises(UserError, match="train.layout: padded: image pairs are always laid out once"):
        plan_resources(_cfg(tmp_path, layout="padded"))


def test_cli_plan_on_image_data(tmp_path):
    res = run_cli("plan", CONFIG, "--json", "--set", f"output.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["settings"]["vision_params"] > 0 and out["settings"]["largest_batch"]["vision_patches"] > 0
    assert out["peak_memory_mb"] > out["breakdown_mb"]["process"]
