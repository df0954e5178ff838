"""Vision-language models: the tiny local VLMs, processor loading, and the pair layout with each image encoded once.

Aliases (built deterministically on this machine, like the tiny LLaMA; no download):
- `dpokit-tiny-vlm`: LLaVA-style (a CLIP vision tower, a projector, a LLaMA decoder). The processor expands each
  `<image>` placeholder to a fixed run of image tokens (16 per 32x32 image); positions are plain 1-D.
- `dpokit-tiny-smolvlm`: Idefics3/SmolVLM-style (a SigLIP-like vision tower, pixel-shuffle merging by 2, a LLaMA
  decoder). The processor expands each `<image>` to `<fake_token_around_image><global-img>`, 4 image tokens and
  `<fake_token_around_image>`; pixel values are (prompts, images, 3, H, W) with a pixel mask.

Both load with `AutoModelForImageTextToText` + `AutoProcessor`, `trust_remote_code` off.

Qwen2-VL-style models (3-D multimodal RoPE): `pack_vision_pairs(rope_index=mrope_index_fn(model))` gives the packed
rows their 3-D positions (`packed_mrope_positions`); tests/test_vlm.py checks it equals each sequence scored alone on
a Qwen2-VL model built from its config. There is no tiny Qwen2-VL alias: transformers 5.24's Qwen2VLProcessor needs
a video processor, which needs torchvision (not a dpokit dependency).

Layout. A vision pair is encoded as `prompt_ids` (image tokens already expanded by the processor), `chosen_ids`,
`rejected_ids` and the processor's image tensors for the prompt's images only (`pixel_values`, plus
`image_grid_thw` for Qwen2-VL). `pack_vision_pairs` lays each pair out once, `[prompt, chosen, rejected]`
(`dpokit.core.packing.pack_pairs`), and hands the model each pair's pixel values once, ordered as the pairs appear
in the packed rows (the model scatters image features into image-token positions in row-major order), so the vision
tower encodes each image once per pair. `pad_vision_pairs` is the reference layout (two rows per pair, each image
encoded twice, as TRL's `DataCollatorForVisionPreference` does). `dpokit.core.packing.batch_logps` scores both.
With a frozen tower, `share_frozen_tower` lets the reference forward reuse the policy's encodes of the same batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from dpokit.core.batching import IMAGE_KEYS, pad_pairs
from dpokit.core.errors import UserError
from dpokit.core.models import _atomic_build, build_tiny_tokenizer, cache_dir, quiet_hf, resolve_model_path
from dpokit.core.packing import pack_pairs

VLM_ALIASES = {"dpokit-tiny-vlm": "llava", "dpokit-tiny-smolvlm": "idefics3"}
LLAVA_IMAGE = "<image>"
IDEFICS_IMAGE = "<image>"


def _chat_template(image_text: str) -> str:
    """ChatML whose message content may be a string or a list of parts ({"type": "text"/"image"})."""
    return (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + image_text + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def _build_tiny_vlm(family: str, out: Path) -> None:
    from transformers import AutoModelForImageTextToText

    tokenizer = build_tiny_tokenizer("llama")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", LLAVA_IMAGE]})
        text.update(model_type="llama", vocab_size=len(tokenizer), tie_word_embeddings=False)
        config = LlavaConfig(
            text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
            vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
        )
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=_chat_template(LLAVA_IMAGE))
    elif family == "idefics3":
        from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

        specials = ["<|im_start|>", "<fake_token_around_image>", IDEFICS_IMAGE, "<end_of_utterance>", "<global-img>"]
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
        text.update(model_type="llama", vocab_size=len(tokenizer), tie_word_embeddings=False)
        config = Idefics3Config(
            text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IDEFICS_IMAGE), scale_factor=2,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8),
            tie_word_embeddings=False,
        )
        image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                                 max_image_size={"longest_edge": 32})
        # (32 / 8)^2 patches, merged 2x2 (scale_factor): 4 image tokens per image, between its marker tokens
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                      chat_template=_chat_template(IDEFICS_IMAGE))
    else:  # pragma: no cover - VLM_ALIASES lists the families
        raise ValueError(family)
    tokenizer.chat_template = processor.chat_template
    with torch.random.fork_rng(devices=[]), quiet_hf():
        torch.default_generator.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config)
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)


def resolve_vlm_path(name_or_path: str) -> str:
    """A VLM alias's local folder (built on first use); anything else as `resolve_model_path` maps it."""
    if name_or_path in VLM_ALIASES:
        family = VLM_ALIASES[name_or_path]
        return str(_atomic_build(cache_dir() / "models" / name_or_path, lambda out: _build_tiny_vlm(family, out)))
    return resolve_model_path(name_or_path)


def load_processor(name_or_path: str, *, revision=None, trust_remote_code=False):
    """The model's processor (tokenizer + image processor), right padding, a pad token set."""
    from transformers import AutoProcessor

    path = resolve_vlm_path(name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "image processor" in first.lower():
            processor = None  # a tokenizer without its image processor: the message below
        else:
            raise UserError(f"model.name_or_path: cannot load a processor for {name_or_path!r} ({first})") from None
    if getattr(processor, "image_processor", None) is None:
        raise UserError(f"model.name_or_path: the processor of {name_or_path!r} has no image processor (no "
                        "processor_config.json / preprocessor_config.json); use a vision-language model's folder with "
                        "its processor")
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return processor


def load_vlm(name_or_path: str, *, dtype: torch.dtype = torch.float32, revision=None, trust_remote_code=False):
    """A vision-language model through `AutoModelForImageTextToText` (safetensors only)."""
    from transformers import AutoModelForImageTextToText

    path = resolve_vlm_path(name_or_path)
    with quiet_hf(logs=False):
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, revision=revision,
                                                           trust_remote_code=trust_remote_code, use_safetensors=True)


def vision_tower(model) -> torch.nn.Module:
    """The module that encodes images (for freezing it, or counting its forwards)."""
    from dpokit.core.wrapped import transformers_model

    inner = transformers_model(model) or model
    base = getattr(inner, "model", inner)
    for name in ("vision_tower", "visual", "vision_model"):
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    raise UserError(f"{type(inner).__name__} has no vision tower dpokit knows (vision_tower, visual, vision_model)")


def image_token_id(processor) -> int:
    tok = processor.tokenizer
    return tok.convert_tokens_to_ids(getattr(processor, "image_token", None) or getattr(tok, "image_token", None))


def count_placeholders(text: str, processor) -> int:
    """Image placeholders in a rendered prompt, before the processor expands them."""
    return text.count(getattr(processor, "image_token", None) or LLAVA_IMAGE)


def encode_vision_prompt(prompt_text: str, images: list, processor) -> dict:
    """The prompt's ids (image tokens expanded) and its image tensors, one image set per prompt."""
    if count_placeholders(prompt_text, processor) != len(images):
        raise UserError(f"the prompt has {count_placeholders(prompt_text, processor)} image placeholders and "
                        f"{len(images)} images; give one image per placeholder")
    out = processor(text=[prompt_text], images=images or None, add_special_tokens=False, return_tensors="pt")
    enc = {"prompt_ids": out["input_ids"][0].tolist()}
    for key in IMAGE_KEYS:
        if key in out:
            enc[key] = out[key]
    return enc


def is_vision_pair(pair: dict) -> bool:
    """An encoded pair that carries image tensors (`encode_vision_pair`)."""
    return any(key in pair for key in IMAGE_KEYS)


def _image_tensors(pairs: list[dict], order: list[int]) -> dict[str, torch.Tensor]:
    """The pairs' image tensors in `order` (a pair's images in its prompt's order). LLaVA-style tensors are one row
    per image and stack on dim 0; Idefics3-style ones are (prompts, images, ...) and every image goes into one
    prompt slot (dim 1), which the model flattens to images anyway: no padding images between pairs."""
    out = {}
    for key in IMAGE_KEYS:
        parts = [pairs[i][key] for i in order if key in pairs[i]]
        if parts:
            per_prompt = "pixel_attention_mask" in pairs[order[0]]
            out[key] = torch.cat(parts, dim=1 if per_prompt else 0)
    return out


def pack_vision_pairs(pairs: list[dict], pad_id: int, rope_index=None) -> dict:
    """Packed layout of vision pairs (`dpokit.core.packing.pack_pairs`, dense attention) with each pair's image
    tensors once, in the order the pairs sit in the rows. `rope_index` (from `mrope_index_fn`): multimodal position
    ids for the packed rows (Qwen2-VL)."""
    batch = pack_pairs(pairs, pad_id)
    order = []
    for doc in batch["document_ids"].reshape(-1).tolist():
        if doc >= 0 and (not order or order[-1] != doc):
            order.append(doc)
    batch.update(_image_tensors(pairs, order))
    if rope_index is not None:
        batch["position_ids"] = packed_mrope_positions(batch, pairs, rope_index)
    return batch


def pad_vision_pairs(pairs: list[dict], pad_id: int, rope_index=None) -> dict:
    """Two right-padded rows per pair ([chosen rows, rejected rows]), each with the pair's images: every image is
    encoded twice (the reference layout, TRL's)."""
    batch = pad_pairs(pairs, pad_id)
    order = list(range(len(pairs))) * 2
    batch.update(_image_tensors(pairs, order))
    if rope_index is not None:
        grid = batch.get("image_grid_thw")
        batch["position_ids"] = rope_index(batch["input_ids"], grid, batch["attention_mask"])
    return batch


def mrope_index_fn(model):
    """Qwen2-VL-style models (multimodal RoPE): a function (input_ids, image_grid_thw, attention_mask) -> (3, B, L)
    position ids from the model's own `get_rope_index`; None for models with 1-D positions."""
    from dpokit.core.wrapped import transformers_model

    inner = transformers_model(model) or model
    base = getattr(inner, "model", inner)
    get = getattr(base, "get_rope_index", None)
    if get is None:
        return None
    image_id = inner.config.image_token_id

    def rope_index(input_ids, image_grid_thw, attention_mask):
        positions, _ = get(input_ids, mm_token_type_ids=(input_ids == image_id).int(), image_grid_thw=image_grid_thw,
                           attention_mask=attention_mask)
        return positions

    return rope_index


def packed_mrope_positions(batch: dict, pairs: list[dict], rope_index) -> torch.Tensor:
    """(3, R, W) multimodal positions of a packed batch: each pair's `prompt + chosen` positions from the model's
    own rope index, and the rejected tokens continuing from the prompt's last position (text tokens advance all
    three axes together), so every response sees the positions of its own unpadded sequence."""
    rows, width = batch["input_ids"].shape
    positions = torch.zeros((3, rows, width), dtype=torch.long)
    docs = batch["document_ids"]
    for i, p in enumerate(pairs):
        r, cols = (docs == i).nonzero(as_tuple=True)
        r = int(r[0])
        start = int(cols.min())
        seq = torch.tensor([p["prompt_ids"] + p["chosen_ids"]])
        grid = p.get("image_grid_thw")
        pos = rope_index(seq, grid, torch.ones_like(seq))[:, 0]  # (3, lp + lc)
        lp, lc, lr = len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"])
        positions[:, r, start:start + lp + lc] = pos
        base = (pos[:, lp - 1].max() + 1) if lp else torch.tensor(0)
        positions[:, r, start + lp + lc:start + lp + lc + lr] = base + torch.arange(lr)
    return positions


def encode_vision_pair(row: dict, images: list, processor) -> dict:
    """Token ids and image tensors of one vision pair. `row`: a conversational `prompt` (messages whose content may
    hold `{"type": "image"}` parts) or a plain one with the model's image placeholder, and `chosen`/`rejected`
    (assistant messages or text); `images`: PIL images, one per placeholder, in order. The prompt goes through the
    processor (image tokens expanded), the responses through the tokenizer alone, as TRL's vision collator does
    (no special tokens added: the chat template writes them)."""
    from dpokit.core.templates import render_responses

    tokenizer = processor.tokenizer
    prompt_text, (chosen_text, rejected_text) = render_responses(row["prompt"], [row["chosen"], row["rejected"]],
                                                                 tokenizer)
    enc = encode_vision_prompt(prompt_text, images, processor)
    enc["chosen_ids"] = tokenizer(chosen_text, add_special_tokens=False)["input_ids"]
    enc["rejected_ids"] = tokenizer(rejected_text, add_special_tokens=False)["input_ids"]
    enc["num_images"] = len(images)
    return enc


def _same_call(a, b) -> bool:
    """Whether two (args, kwargs) of a tower call are the same inputs (tensors by value)."""
    (args_a, kw_a), (args_b, kw_b) = a, b
    if len(args_a) != len(args_b) or set(kw_a) != set(kw_b):
        return False
    for x, y in zip([*args_a, *(kw_a[k] for k in sorted(kw_a))], [*args_b, *(kw_b[k] for k in sorted(kw_b))]):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in a module output (a tensor, a ModelOutput / dict, tuples of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _tower_is_deterministic(tower: torch.nn.Module) -> bool:
    """No dropout left in the tower (nn.Dropout modules at p=0, attention dropout rates at 0) and no batch norm
    (whose train mode differs from eval)."""
    for module in tower.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return False
        for name in ("dropout", "attention_dropout", "dropout_p"):
            rate = getattr(module, name, None)
            if isinstance(rate, float) and rate > 0:
                return False
    return True


class SharedTowerOutput:
    """The policy's frozen vision-tower output, reused by the reference forward of the same batch.

    With train.freeze_vision the policy's tower never changes, and the reference (a frozen copy of the initial
    policy, or the policy itself with its adapter off) has the same tower: the reference forward would encode the
    same images with the same weights again. A forward hook records the policy tower's last call (inputs and
    output) when the output carries no gradient; inside `reusing()` the reference tower returns that output
    when it is called on equal inputs (tensors compared by value), and computes as usual otherwise.
    `share_frozen_tower` builds one only when this is exact; `hits` counts the encodes saved."""

    def __init__(self, policy_tower: torch.nn.Module, ref_tower: torch.nn.Module):
        self.ref_tower = ref_tower
        self.last = None
        self.hits = 0
        self.handle = policy_tower.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, out):
        tensors = _tensors(out)
        self.last = None if not tensors or any(t.requires_grad for t in tensors) else ((args, kwargs), out)

    @contextmanager
    def reusing(self):
        tower, last = self.ref_tower, self.last

        def forward(*args, **kwargs):
            if last is not None and _same_call((args, kwargs), last[0]):
                self.hits += 1
                return last[1]
            return type(tower).forward(tower, *args, **kwargs)

        tower.forward = forward  # an instance attribute: Module.__call__ runs it, the class is untouched
        try:
            yield
        finally:
            del tower.forward
            self.last = None  # one batch's features only

    def close(self):
        self.handle.remove()


def share_frozen_tower(policy, ref_model=None) -> SharedTowerOutput | None:
    """A SharedTowerOutput when reusing the policy's tower output in the reference forward is exact: the policy's
    tower is frozen (no parameter requires grad) and has no dropout, and the reference's tower is the same module
    (LoRA: the reference is the policy with its adapter off; `ref_model` None) or a module with equal weights and
    buffers (a frozen copy). None otherwise (a trained tower, another reference model, a model without a tower)."""
    try:
        tower = vision_tower(policy)
        ref_tower = tower if ref_model is None else vision_tower(ref_model)
    except UserError:
        return None
    if any(p.requires_grad for p in tower.parameters()) or not _tower_is_deterministic(tower):
        return None
    if ref_tower is not tower:
        if type(ref_tower) is not type(tower) or not _tower_is_deterministic(ref_tower):
            return None
        mine, theirs = tower.state_dict(), ref_tower.state_dict()
        if mine.keys() != theirs.keys() or not all(
                mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype and
                torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in mine):
            return None
    return SharedTowerOutput(tower, ref_tower)
