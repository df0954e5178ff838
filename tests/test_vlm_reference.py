"""`train.reference: precomputed` on image pairs (issue 29): the reference log-probs are computed once, in the
training layout with each image encoded once, cached under a key that holds the pixel values, and reused."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-vlm.yaml"


def _config(tmp_path, name, **train):
    raw = yaml.safe_load(CONFIG.read_text())
    raw["data"]["source"] = str((CONFIG.parent / raw["data"]["source"]).resolve())
    raw["train"].update(max_steps=3, logging_steps=1, save_steps=100, **train)
    raw["eval"] = {"enabled": False}
    raw["output"] = {"dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_precomputed_reference_on_images_equals_the_adapter_reference_and_is_reused(tmp_path):
    """LoRA starts at the base, so the precomputed reference (the initial policy) is the adapter-disabled base: the
    same losses as `reference: adapter`, with no reference forward while training; a second run hits the cache."""
    env = {"DPOKIT_CACHE": str(tmp_path / "cache")}
    adapter = run_cli("train", _config(tmp_path, "adapter", reference="adapter"), env=env)
    assert adapter.returncode == 0, adapter.stderr[-2000:]
    first = run_cli("train", _config(tmp_path, "pre1", reference="precomputed"), env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli("train", _config(tmp_path, "pre2", reference="precomputed"), env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    s1, s2 = (json.loads((tmp_path / n / "train_summary.json").read_text()) for n in ("pre1", "pre2"))
    assert s1["reference_cache"]["cache"] == "miss" and s2["reference_cache"]["cache"] == "hit"
    assert s1["reference_forwards"]["training"] == 0 == s2["reference_forwards"]["training"]
    assert _losses(tmp_path / "pre1") == pytest.approx(_losses(tmp_path / "adapter"), abs=1e-5)
    assert _losses(tmp_path / "pre2") == _losses(tmp_path / "pre1")


def test_the_cache_key_holds_the_pixels(tmp_path):
    """Two pair sets with the same token ids and different images have different fingerprints (so a cached
    reference of one is never read for the other); the same images give the same one."""
    from PIL import Image

    from dpokit.core.scoring import pairs_fingerprint
    from dpokit.core.vision import encode_vision_pair, load_processor

    processor = load_processor("dpokit-tiny-vlm")
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}],
           "chosen": [{"role": "assistant", "content": "a red circle"}],
           "rejected": [{"role": "assistant", "content": "a blue square"}]}
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    a, b, a2 = (encode_vision_pair(row, [img], processor) for img in (red, blue, red.copy()))
    assert a["prompt_ids"] == b["prompt_ids"] and not torch.equal(a["pixel_values"], b["pixel_values"])
    assert pairs_fingerprint([a]) != pairs_fingerprint([b])
    assert pairs_fingerprint([a]) == pairs_fingerprint([a2])


def test_token_budget_batches_of_image_pairs(tmp_path):
    """train.max_tokens_per_batch on image pairs: every batch the trainer draws holds at most the budget of
    prefix-shared tokens (image tokens included), each pair once an epoch, and the run trains."""
    from dpokit.core.config import load_config
    from dpokit.core.packing import pair_length
    from dpokit.train.plan import plan_training
    from dpokit.train.trainer import build_trainer, setup_vision

    budget = 200
    cfg = load_config(_config(tmp_path, "budget", max_tokens_per_batch=budget))
    plan = plan_training(cfg)
    s = setup_vision(plan)
    trainer = build_trainer(plan, s, [])
    lengths = [pair_length(p) for p in s.train_enc]
    assert max(lengths) <= budget < sum(lengths)
    seen = []
    for batch in trainer.get_train_dataloader():
        n = int(batch["num_pairs"])
        assert 0 < n and batch["input_ids"].numel() <= budget * 2  # rows as wide as the longest pair
        seen.append(n)
    groups = trainer.token_budget_sampler.batches
    assert sum(seen) == len(s.train_enc) and all(sum(lengths[i] for i in g) <= budget for g in groups)
    result = run_cli("train", _config(tmp_path, "budget-run", max_tokens_per_batch=budget))
    assert result.returncode == 0, result.stderr[-2000:]
