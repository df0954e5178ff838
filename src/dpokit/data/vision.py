"""Vision preference data: rows with images, checked before any weights load.

Formats (detected per row):
- `vision` (TRL's vision preference format): `images` (a list) + `prompt` (messages whose content holds
  `{"type": "image"}` parts, or a string with the model's `<image>` placeholders) + `chosen` / `rejected`
  (assistant messages or text).
- `rlaif_v` (the RLAIF-V shape): `image`, `question`, `chosen`, `rejected`: one image before the question.

Images may be paths (relative to the data file's folder, or absolute), PIL images (through the API), raw bytes, or
the datasets `Image` feature's `{"bytes": ..., "path": ...}` (parquet). They are never dropped or truncated into: a
pair whose prompt with its image tokens plus the longer response exceeds `max_length` is an error.

Checks, each a one-line `UserError` (exit 2) naming the file and row and the fix, before weights load: a missing
or unreadable image, a count of image placeholders that differs from the images given, image data with a text-only
model, a processor without an image processor (`dpokit.core.vision.load_processor`), and image tokens over
`max_length`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.core.errors import UserError
from dpokit.core.models import SMOLLM2_ALIAS, TINY_ALIASES
from dpokit.core.vision import VLM_ALIASES, encode_vision_pair, load_processor
from dpokit.data.sources import READERS, read_local_rows

IMAGE_PLACEHOLDER = "<image>"


def is_vision_row(row: dict) -> bool:
    return isinstance(row, dict) and ("images" in row or "image" in row)


def detect_vision_format(row: dict) -> str | None:
    if "image" in row and "question" in row and "chosen" in row and "rejected" in row:
        return "rlaif_v"
    if "images" in row and "prompt" in row and "chosen" in row and "rejected" in row:
        return "vision"
    return None


def _assistant(value, name: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return value
    raise UserError(f"{where}: {name} must be text or assistant messages; fix that row")


def convert_vision_row(row: dict, where: str) -> dict:
    """A canonical vision row: {prompt (messages or text), chosen, rejected (assistant messages), images (refs)}."""
    fmt = detect_vision_format(row)
    if fmt == "rlaif_v":
        if not isinstance(row["question"], str):
            raise UserError(f"{where}: question must be text; fix that row")
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
        images = [row["image"]]
    elif fmt == "vision":
        prompt, images = row["prompt"], row["images"]
        if not isinstance(images, list):
            images = [images]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
    else:
        raise UserError(f"{where}: a vision row needs images, prompt, chosen, rejected (TRL's vision format) or "
                        "image, question, chosen, rejected (RLAIF-V); fix that row")
    return {"prompt": prompt, "chosen": _assistant(row["chosen"], "chosen", where),
            "rejected": _assistant(row["rejected"], "rejected", where), "images": images}


def count_placeholders(prompt) -> int:
    """Image placeholders of a prompt: `{"type": "image"}` parts of its messages, `<image>` in text content."""
    if isinstance(prompt, str):
        return prompt.count(IMAGE_PLACEHOLDER)
    total = 0
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            total += content.count(IMAGE_PLACEHOLDER)
        elif isinstance(content, list):
            total += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return total


def load_image(ref, base_dir: Path | None, where: str):
    """A PIL image (RGB) from a path (relative to `base_dir`), PIL image, bytes or {"bytes", "path"} dict."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, dict) and ref.get("bytes") is None and ref.get("path"):
        ref = ref["path"]
    if isinstance(ref, dict):
        ref = ref.get("bytes")
    try:
        if isinstance(ref, (bytes, bytearray)):
            with Image.open(io.BytesIO(ref)) as img:
                return img.convert("RGB")
        if isinstance(ref, str):
            path = Path(os.path.expanduser(ref))
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise UserError(f"{where}: image {ref!r} not found (looked for {path}); give a path relative to the "
                                "data file's folder, or an absolute one")
            with Image.open(path) as img:
                return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"{where}: image {preview_ref(ref)} cannot be read ({type(err).__name__}); replace it with "
                        "a PNG or JPEG file") from None
    raise UserError(f"{where}: an image must be a file path, bytes or a PIL image, not {type(ref).__name__}; "
                    "fix that row")


def image_ref(ref, base_dir: Path | None) -> str:
    """A JSON-able record of an image: a path made absolute (relative ones against `base_dir`), else its kind."""
    if isinstance(ref, dict) and ref.get("bytes") is None and ref.get("path"):
        ref = ref["path"]
    if isinstance(ref, str):
        path = Path(os.path.expanduser(ref))
        return str(path if path.is_absolute() or base_dir is None else base_dir / path)
    return preview_ref(ref)


def preview_ref(ref) -> str:
    return repr(ref) if isinstance(ref, str) else f"<{len(ref)} bytes>" if isinstance(ref, (bytes, bytearray)) \
        else f"<{type(ref).__name__}>"


def model_takes_images(name_or_path: str, *, revision=None, trust_remote_code=False) -> bool:
    """Whether a model is a vision-language model, from its config alone (no weights)."""
    if name_or_path in VLM_ALIASES:
        return True
    if name_or_path in TINY_ALIASES or name_or_path == SMOLLM2_ALIAS:
        return False
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(name_or_path), revision=revision,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.name_or_path: cannot read the config of {name_or_path!r} ({first})") from None
    return getattr(config, "vision_config", None) is not None


def check_model_takes_images(model: str, where: str) -> None:
    """Image data with a text-only model: one line naming the first row, before any processor or weights load."""
    if not model_takes_images(model):
        raise UserError(f"{where}: the data holds images and {model!r} is a text-only model (no vision tower); use a "
                        "vision-language model (e.g. dpokit-tiny-vlm) or text-only data")


@dataclass
class VisionData:
    rows: list[dict]  # canonical rows with `images` as PIL images
    encoded: list[dict]  # dpokit.core.vision.encode_vision_pair output, one per row
    locations: list[str]
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> images of that size
    image_tokens: int = 0  # image tokens over all prompts
    max_pair_tokens: int = 0  # the longest prompt (image tokens included) + longer response
    formats: list[str] = field(default_factory=list)  # the row shapes seen (vision, rlaif_v)


def _file_rows(source) -> list[tuple[str, Path | None, dict]]:
    """(location, folder images are relative to, row) of a local file or folder."""
    path = Path(os.path.expanduser(str(source)))
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in READERS)
    out = []
    for f in files:
        out += [(where, f.parent.resolve(), row) for where, row in read_local_rows(f)]
    return out


def vision_rows(source=None, rows: list[dict] | None = None) -> list[tuple[str, Path | None, dict]]:
    """Vision rows from a local file/folder or from the API (`rows`: dicts whose images may be PIL)."""
    if rows is not None:
        return [(f"row {i}", Path.cwd(), r) for i, r in enumerate(rows, start=1)]
    return _file_rows(source)


def load_vision_preferences(model: str, *, source=None, rows: list[dict] | None = None, max_length: int = 1024,
                            processor=None) -> VisionData:
    """Read, convert and check vision preference rows for `model`, then encode them with its processor (which holds
    no weights). Every check runs before a model's weights are loaded."""
    items = vision_rows(source, rows)
    if not items:
        raise UserError(f"{source or 'rows'}: no rows; give at least one preference pair")
    check_model_takes_images(model, items[0][0])
    canonical, locations, formats = [], [], set()
    for where, base, raw in items:
        if not is_vision_row(raw):
            raise UserError(f"{where}: no image/images column in a vision data set; give every row its images "
                            "(an empty images list for a text-only row)")
        formats.add(detect_vision_format(raw) or "vision")
        row = convert_vision_row(raw, where)
        n_parts = count_placeholders(row["prompt"])
        if n_parts != len(row["images"]):
            raise UserError(f"{where}: the prompt has {n_parts} image placeholder{'s' * (n_parts != 1)} "
                            f"({{\"type\": \"image\"}} parts or <image>) and {len(row['images'])} image"
                            f"{'s' * (len(row['images']) != 1)}; give one image per placeholder")
        row["image_refs"] = [image_ref(ref, base) for ref in row["images"]]  # what the run folder records
        row["images"] = [load_image(ref, base, where) for ref in row["images"]]
        canonical.append(row)
        locations.append(where)
    processor = processor or load_processor(model)
    data = VisionData(rows=canonical, encoded=[], locations=locations, formats=sorted(formats))
    image_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_PLACEHOLDER))
    for row, where in zip(canonical, locations, strict=True):
        enc = encode_vision_pair(row, row["images"], processor)
        n_image = enc["prompt_ids"].count(image_id)
        total = len(enc["prompt_ids"]) + max(len(enc["chosen_ids"]), len(enc["rejected_ids"]))
        if total > max_length:
            raise UserError(f"{where}: the prompt with its {len(row['images'])} image(s) ({n_image} image tokens) "
                            f"plus the longer response is {total} tokens, over data.max_length={max_length}; raise "
                            "data.max_length (images are never truncated)")
        for img in row["images"]:
            key = f"{img.width}x{img.height}"
            data.image_sizes[key] = data.image_sizes.get(key, 0) + 1
        data.image_tokens += n_image
        data.max_pair_tokens = max(data.max_pair_tokens, total)
        data.encoded.append(enc)
    return data


def is_vision_source(source: str) -> bool:
    """Whether a local file or folder's first row carries images (hub ids: False)."""
    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        return False
    if path.suffix.lower() == ".jsonl":  # every text run asks: read its first row only, not the whole file
        import json

        try:
            with path.open("rb") as fh:
                first = next((line for line in fh if line.strip()), b"")
            return is_vision_row(json.loads(first)) if first else False
        except (OSError, ValueError):
            return False  # the text path reports the bad file with its own message
    try:
        items = _file_rows(path)
    except UserError:
        return False
    return bool(items) and is_vision_row(items[0][2])


def vision_report(data: VisionData) -> dict:
    """What `dpokit data inspect` prints for vision data."""
    return {"formats": data.formats, "pairs": len(data.rows), "images": sum(len(r["images"]) for r in data.rows),
            "image_sizes": data.image_sizes, "image_tokens": data.image_tokens,
            "max_pair_tokens": data.max_pair_tokens}
