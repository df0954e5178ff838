"""Vision-language DPO (issue 29): the two tiny VLM families, the pair laid out once with each image encoded once,
and parity with trl.DPOTrainer's vision path (DataCollatorForVisionPreference) in fp32.

Families: `dpokit-tiny-vlm` (LLaVA-style: a fixed run of `<image>` tokens per image, one pixel row per image) and
`dpokit-tiny-smolvlm` (Idefics3/SmolVLM-style: `<fake_token_around_image><global-img><image>*4<fake_...>` per image,
pixel values shaped (prompts, images, ...) with a pixel mask)."""

import copy

import pytest
import torch
from PIL import Image

from dpokit.core.config import TrainConfig
from dpokit.core.packing import batch_logps
from dpokit.core.vision import (
    VLM_ALIASES,
    encode_vision_pair,
    load_processor,
    load_vlm,
    pack_vision_pairs,
    pad_vision_pairs,
    resolve_vlm_path,
    vision_tower,
)
from test_trl_parity import (  # one perturbed policy and gradient reader for every parity test
    _grads,
    _perturbed,
)

FAMILIES = list(VLM_ALIASES)


def _image(colour, size=(40, 36)):
    return Image.new("RGB", size, colour)


def _examples(images_per_prompt: int) -> list[dict]:
    """TRL's vision preference format: `images` + conversational prompt with image parts."""
    shapes = [("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))]
    out = []
    for i, (name, colour) in enumerate(shapes):
        images = [_image(colour)] + [_image(shapes[(i + 1) % 3][1], (30, 44))] * (images_per_prompt - 1)
        parts = [{"type": "image"}] * images_per_prompt + [{"type": "text", "text": "What colour is the first square?"}]
        out.append({
            "images": images,
            "prompt": [{"role": "user", "content": parts}],
            "chosen": [{"role": "assistant", "content": f"The square is {name}."}],
            "rejected": [{"role": "assistant", "content": "It is a yellow circle" + " maybe" * i + "."}],
        })
    return out


def _pairs(examples, processor):
    return [encode_vision_pair({k: e[k] for k in ("prompt", "chosen", "rejected")}, e["images"], processor)
            for e in examples]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    return name, load_vlm(name), load_processor(name)


class ImageCounter:
    """Counts the images the vision tower encodes (a forward hook on it), and its forward calls."""

    def __init__(self, model):
        self.images = 0
        self.calls = 0
        self.handle = vision_tower(model).register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        pixels = args[0] if args else kwargs["pixel_values"]
        self.calls += 1
        self.images += pixels.shape[0]

    def close(self):
        self.handle.remove()


def test_tiny_vlms_load_with_auto_classes_and_differ_in_image_tokens():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    schemes = {}
    for name in FAMILIES:
        path = resolve_vlm_path(name)
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        assert processor.image_processor is not None and processor.tokenizer.chat_template
        enc = _pairs(_examples(1)[:1], processor)[0]
        tokens = processor.tokenizer.convert_ids_to_tokens(enc["prompt_ids"])
        schemes[name] = [t for t in tokens if t.startswith("<") and t.endswith(">") and "im_" not in t]
        out = model(input_ids=torch.tensor([enc["prompt_ids"]]), pixel_values=enc["pixel_values"],
                    **({"pixel_attention_mask": enc["pixel_attention_mask"]} if "pixel_attention_mask" in enc else {}))
        assert out.logits.shape[:2] == (1, len(enc["prompt_ids"]))
    assert schemes["dpokit-tiny-vlm"] == ["<image>"] * 16
    assert schemes["dpokit-tiny-smolvlm"] == ["<fake_token_around_image>", "<global-img>", *["<image>"] * 4,
                                              "<fake_token_around_image>"]
    # deterministic build: the same weights every time
    assert load_vlm("dpokit-tiny-vlm").state_dict()["lm_head.weight"].sum() == \
        load_vlm("dpokit-tiny-vlm").state_dict()["lm_head.weight"].sum()


@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_packed_equals_padded_and_each_image_encoded_once(family, images_per_prompt):
    name, model, processor = family
    pairs = _pairs(_examples(images_per_prompt), processor)
    pad = processor.tokenizer.pad_token_id
    model.eval()
    counter = ImageCounter(model)
    try:
        with torch.no_grad():
            packed = batch_logps(model, pack_vision_pairs(pairs, pad))
            packed_images, packed_calls = counter.images, counter.calls
            counter.images = counter.calls = 0
            padded = batch_logps(model, pad_vision_pairs(pairs, pad))
    finally:
        counter.close()
    n_images = len(pairs) * images_per_prompt
    assert (packed_calls, packed_images) == (1, n_images)  # one encode of each pair's images
    assert counter.images == 2 * n_images  # two rows per pair: every image twice
    for key in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-5, atol=1e-5)
    # each pair's prompt appears once in the packed rows, with its image tokens once
    image_id = model.config.image_token_id
    batch = pack_vision_pairs(pairs, pad)
    per_prompt = sum(p["prompt_ids"].count(image_id) for p in pairs)
    assert int((batch["input_ids"] == image_id).sum()) == per_prompt
    assert int((pad_vision_pairs(pairs, pad)["input_ids"] == image_id).sum()) == 2 * per_prompt


def _dpokit_side(base, processor, examples, tmp_path):
    from transformers import TrainingArguments

    from dpokit.train.trainer import DPOTrainer

    pairs = _pairs(examples, processor)
    policy, ref = _perturbed(base), copy.deepcopy(base).eval().requires_grad_(False)
    args = TrainingArguments(output_dir=str(tmp_path / "ours"), report_to=[], remove_unused_columns=False,
                             per_device_train_batch_size=len(pairs))
    trainer = DPOTrainer(model=policy, args=args, train_dataset=pairs, processing_class=processor.tokenizer,
                         data_collator=lambda rows: pack_vision_pairs(rows, processor.tokenizer.pad_token_id),
                         dpo_cfg=TrainConfig(loss="sigmoid", beta=0.1), ref_model=ref)
    counters = [ImageCounter(policy), ImageCounter(ref)]
    policy.train()
    loss = trainer.compute_loss(policy, pack_vision_pairs(pairs, processor.tokenizer.pad_token_id))
    loss.backward()
    for c in counters:
        c.close()
    metrics = {k: v[0] for k, v in trainer._stored["train"].items()}
    return loss.item(), metrics, _grads(policy), [c.images for c in counters]


def _trl_side(base, processor, examples, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    policy, ref = _perturbed(base), copy.deepcopy(base).eval().requires_grad_(False)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.1, loss_type=["sigmoid"],
                     max_length=None, per_device_train_batch_size=len(examples), bf16=False)
    trainer = TRLDPOTrainer(model=policy, ref_model=ref, args=args, processing_class=processor,
                            train_dataset=Dataset.from_list(copy.deepcopy(examples)))
    batch = DataCollatorForVisionPreference(processor)(copy.deepcopy(examples))
    counters = [ImageCounter(trainer.model), ImageCounter(ref)]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    for c in counters:
        c.close()
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, _grads(trainer.model), [c.images for c in counters]


@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_matches_trl_vision_dpo(family, images_per_prompt, tmp_path):
    """One batch, policy and a reference of different weights: loss, log-probs, rewards and every parameter's
    gradient equal TRL's within 1e-5 (fp32); dpokit's vision towers encode each image once, TRL's twice."""
    name, base, processor = family
    examples = _examples(images_per_prompt)
    torch.manual_seed(0)
    ours_loss, ours_m, ours_g, ours_images = _dpokit_side(base, processor, examples, tmp_path)
    trl_loss, trl_m, trl_g, trl_images = _trl_side(base, processor, examples, tmp_path)
    assert ours_loss == pytest.approx(trl_loss, rel=1e-5)
    assert abs(ours_loss - 0.6931) > 1e-4  # the reference differs from the policy: a non-trivial loss
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        # rewards are beta x differences of ~100-nat fp32 sums: 1e-5 absolute is their float noise
        assert ours_m[key] == pytest.approx(trl_m[key], rel=1e-5, abs=1e-5), key
    assert set(ours_g) == set(trl_g) and ours_g
    total = torch.cat([g.reshape(-1) for g in trl_g.values()]).norm().item()
    assert torch.cat([(ours_g[k] - g).reshape(-1) for k, g in trl_g.items()]).norm().item() < 1e-5 * total
    for param, grad in ours_g.items():
        # Each tensor within 1e-5 of its own norm; tensors whose gradient is float noise next to the whole model's
        # (attention key biases, which softmax cancels; the first vision layer's keys: ~1e-6 of it) are held to
        # 1e-5 of a floor of 1e-3 x the whole gradient's norm instead.
        diff, scale = (grad - trl_g[param]).norm().item(), trl_g[param].norm().item()
        assert diff <= 1e-5 * max(scale, 1e-3 * total), (param, diff, scale)
    n_images = len(examples) * images_per_prompt
    assert ours_images == [n_images, n_images]  # policy, reference: each image once per pair
    assert trl_images == [2 * n_images, 2 * n_images]  # chosen row and rejected row


def test_qwen2vl_mrope_positions_in_the_shared_layout():
    """Qwen2-VL's 3-D multimodal RoPE does not block the shared layout: with `packed_mrope_positions` (prompt +
    chosen from the model's own rope index, rejected continuing from the prompt) the packed pairs' log-probs equal
    each `prompt + response` scored alone with the positions the model computes itself, and each pair's images are
    encoded once. Built from a config (no processor: transformers 5.24's Qwen2VLProcessor needs torchvision)."""
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    from dpokit.core.batching import token_logps
    from dpokit.core.vision import mrope_index_fn

    image, start, end = 297, 298, 299
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2VLConfig(text_config=text, image_token_id=image, vision_start_token_id=start,
                           vision_end_token_id=end, video_token_id=296,
                           vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)

    def pair(grids, chosen, rejected):  # grids: (t, h, w) patches per image; 2x2 merge -> h*w/4 image tokens
        prompt = [5, 6]
        for t, h, w in grids:
            prompt += [start] + [image] * (t * h * w // 4) + [end] + [7]
        prompt += [8, 9]
        patches = sum(t * h * w for t, h, w in grids)
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
                "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=gen),
                "image_grid_thw": torch.tensor(grids)}

    pairs = [pair([(1, 4, 4)], [10, 11, 12, 13], [20, 21]), pair([(1, 4, 6), (1, 2, 2)], [14, 15], [22, 23, 24])]
    counter = ImageCounter(model)
    with torch.no_grad():
        packed = batch_logps(model, pack_vision_pairs(pairs, 0, rope_index=mrope_index_fn(model)))
        assert counter.calls == 1 and counter.images == sum(int(p["image_grid_thw"].prod(-1).sum()) for p in pairs)
        for i, p in enumerate(pairs):
            for key, slot in (("chosen_ids", "chosen"), ("rejected_ids", "rejected")):
                ids = torch.tensor([p["prompt_ids"] + p[key]])
                logits = model(input_ids=ids, pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"],
                               mm_token_type_ids=(ids == image).int()).logits
                n = len(p["prompt_ids"])
                alone = token_logps(logits[0, n - 1:-1], ids[0, n:]).sum()
                torch.testing.assert_close(packed[slot][i], alone, rtol=1e-5, atol=1e-5)
    counter.close()


class EncodeCounter(ImageCounter):
    """Images the tower really encodes: a hook on its patch embeddings, inside the tower's forward (a tower call
    answered from SharedTowerOutput runs the tower's own hooks, not its layers)."""

    def __init__(self, model):
        self.images = self.calls = 0
        embeddings = next(m for n, m in vision_tower(model).named_modules() if n.endswith("embeddings"))
        self.handle = embeddings.register_forward_hook(self._hook, with_kwargs=True)


def _one_step(base, processor, examples, tmp_path, share: bool, lora: bool = False):
    """Loss, gradients and tower encodes (policy, reference) of one training batch through dpokit's DPOTrainer, the
    towers frozen and the reference the initial weights (a frozen copy, or with LoRA the adapter switched off)."""
    from transformers import TrainingArguments

    from dpokit.core.vision import share_frozen_tower
    from dpokit.train.trainer import DPOTrainer, apply_lora, disable_dropout

    pairs = _pairs(examples, processor)
    pad = processor.tokenizer.pad_token_id
    policy = copy.deepcopy(base)
    disable_dropout(policy)
    vision_tower(policy).requires_grad_(False)
    ref = None if lora else copy.deepcopy(base).eval().requires_grad_(False)
    if lora:
        from dpokit.core.config import LoraConfig
        from dpokit.train.vision import lora_targets

        policy = apply_lora(policy, LoraConfig(r=4), lora_targets(policy, "all-linear", freeze_vision=True))
    args = TrainingArguments(output_dir=str(tmp_path / f"share{share}{lora}"), report_to=[],
                             remove_unused_columns=False, per_device_train_batch_size=len(pairs))
    trainer = DPOTrainer(model=policy, args=args, train_dataset=pairs, processing_class=processor.tokenizer,
                         data_collator=lambda rows: pack_vision_pairs(rows, pad),
                         dpo_cfg=TrainConfig(loss="sigmoid", beta=0.1), ref_model=ref)
    if share:
        trainer.vision_share = share_frozen_tower(policy, ref)
        assert trainer.vision_share is not None
    counters = [EncodeCounter(policy)] + ([] if lora else [EncodeCounter(ref)])
    policy.train()
    batch = pack_vision_pairs(pairs, pad)
    with torch.no_grad():  # move the trainable weights off the reference's, so the loss is not ln 2
        gen = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    loss = trainer.compute_loss(policy, batch)
    loss.backward()
    images = [c.images for c in counters]
    for c in counters:
        c.close()
    hits = trainer.vision_share.hits if share else 0
    return loss.item(), _grads(policy), images, hits


@pytest.mark.parametrize("lora", [False, True])
def test_reference_reuses_the_frozen_towers_image_encodes(family, lora, tmp_path):
    """With the tower frozen, the reference forward reuses the policy's image encodes of the batch
    (share_frozen_tower, what `dpokit train` turns on): the same loss and gradients as encoding again, and the
    images go through a tower once per step instead of twice."""
    name, base, processor = family
    examples = _examples(2)
    loss, grads, images, hits = _one_step(base, processor, examples, tmp_path, share=False, lora=lora)
    loss_s, grads_s, images_s, hits_s = _one_step(base, processor, examples, tmp_path, share=True, lora=lora)
    assert abs(loss - 0.6931) > 1e-4
    assert loss_s == pytest.approx(loss, rel=1e-6, abs=1e-7)
    assert set(grads_s) == set(grads) and grads
    for key, grad in grads.items():
        torch.testing.assert_close(grads_s[key], grad, rtol=1e-5, atol=1e-7)
    n_images = len(examples) * 2
    assert (images, hits) == (([n_images, n_images] if not lora else [2 * n_images]), 0)
    # shared: the policy's tower encodes once, the reference's is not run (LoRA: one tower, one encode)
    assert (images_s, hits_s) == (([n_images, 0] if not lora else [n_images]), 1)


def test_towers_are_not_shared_unless_it_is_exact(family):
    from dpokit.core.vision import share_frozen_tower

    name, base, _ = family
    frozen = copy.deepcopy(base)
    vision_tower(frozen).requires_grad_(False)
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    assert share_frozen_tower(frozen, ref) is not None
    assert share_frozen_tower(copy.deepcopy(base), ref) is None  # the tower trains
    other = _perturbed(base).eval().requires_grad_(False)
    assert share_frozen_tower(frozen, other) is None  # another reference model: other tower weights
    attention = next(m for m in vision_tower(frozen).modules() if isinstance(getattr(m, "dropout", None), float))
    attention.dropout = 0.1  # attention dropout in the training policy's tower: its encodes are not the reference's
    assert share_frozen_tower(frozen, ref) is None
