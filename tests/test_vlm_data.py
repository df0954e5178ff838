"""Vision preference data (issue 29): TRL's vision format and the RLAIF-V shape, images as paths relative to the data
file, parquet bytes or PIL through the API, several images per prompt; image tokens count toward max_length; bad
inputs exit 2 with one line naming the file and row and the fix, before any weights load."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_main
from dpokit.core.errors import UserError
from dpokit.data.vision import load_vision_preferences

ROOT = Path(__file__).resolve().parents[1]
MAKE_SHAPES = ROOT / "configs" / "data" / "make_shapes_prefs.py"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The generated shapes set, written by its script (a real subprocess) into a fresh folder."""
    out = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, str(MAKE_SHAPES), str(out)], check=True, capture_output=True)
    return out / "shapes_prefs.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(images, parts=None, chosen="A red square.", rejected="A blue circle."):
    parts = [{"type": "image"}] * len(images) if parts is None else parts
    return {"images": images, "prompt": [{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_trl_vision_format_with_relative_paths(shapes):
    data = load_vision_preferences("dpokit-tiny-vlm", source=shapes, max_length=128)
    assert len(data.rows) == 48 and data.formats == ["vision"]
    assert all(isinstance(img, Image.Image) for r in data.rows for img in r["images"])
    assert data.image_sizes == {"32x32": 48}
    assert data.image_tokens == 48 * 16  # LLaVA-style: 16 image tokens per 32x32 image, counted
    enc = data.encoded[0]
    assert tuple(enc["pixel_values"].shape) == (1, 3, 32, 32)
    assert data.locations[0] == f"{shapes}:1"


def test_rlaif_v_shape_with_parquet_image_bytes(tmp_path):
    """RLAIF-V rows (image, question, chosen, rejected) with the image stored as the datasets Image feature's
    {"bytes", "path"} struct in parquet, as `datasets` writes it."""
    import io

    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    images = []
    for colour in [(200, 0, 0), (0, 200, 0)]:
        buf = io.BytesIO()
        Image.new("RGB", (20, 24), colour).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    ds = Dataset.from_dict({"image": images, "question": ["Colour?", "Colour?"], "chosen": ["Red.", "Green."],
                            "rejected": ["Blue.", "Pink."]},
                           features=Features({"image": ImageFeature(), "question": Value("string"),
                                              "chosen": Value("string"), "rejected": Value("string")}))
    path = tmp_path / "rlaif.parquet"
    ds.to_parquet(str(path))
    data = load_vision_preferences("dpokit-tiny-smolvlm", source=path, max_length=128)
    assert data.formats == ["rlaif_v"] and len(data.rows) == 2
    assert data.image_sizes == {"20x24": 2}
    assert data.rows[1]["images"][0].getpixel((0, 0)) == (0, 200, 0)
    assert data.rows[0]["prompt"][0]["content"][0] == {"type": "image"}
    assert data.image_tokens == 2 * 4  # Idefics3-style: 4 image tokens per image


def test_pil_images_through_the_api_and_two_images_per_prompt():
    rows = [_row([Image.new("RGB", (32, 32), "red"), Image.new("RGB", (40, 30), "blue")])]
    data = load_vision_preferences("dpokit-tiny-vlm", rows=rows, max_length=256)
    assert data.image_sizes == {"32x32": 1, "40x30": 1}
    assert tuple(data.encoded[0]["pixel_values"].shape) == (2, 3, 32, 32)
    assert data.image_tokens == 32


def test_image_tokens_count_toward_max_length():
    rows = [_row([Image.new("RGB", (32, 32), "red")])]
    total = load_vision_preferences("dpokit-tiny-vlm", rows=rows, max_length=1000).max_pair_tokens
    assert total > 16  # the prompt's 16 image tokens are part of it
    load_vision_preferences("dpokit-tiny-vlm", rows=rows, max_length=total)
    with pytest.raises(UserError, match=r"row 1: .*16 image tokens.*over data.max_length=.*never truncated"):
        load_vision_preferences("dpokit-tiny-vlm", rows=rows, max_length=total - 1)


def _inspect(run, path, model="dpokit-tiny-vlm", *extra):
    return run("data", "inspect", path, "--model", model, *extra)


def _assert_one_line_exit_2(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "torchvision" not in line]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(cli, capfd, tmp_path):
    """The first case in a real process, the others through the CLI's entry point in this one (the same code, without
    a fresh interpreter's 5 s each)."""
    def in_process(*args):
        return run_main(capfd, *args)

    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), "red").save(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image at all")
    before = sorted(p.name for p in tmp_path.rglob("*"))

    missing = _write_jsonl(tmp_path / "missing.jsonl", [_row(["images/ok.png"]), _row(["images/nope.png"])])
    _assert_one_line_exit_2(_inspect(cli, missing), f"{missing}:2", "'images/nope.png' not found",
                            "relative to the data file")
    unreadable = _write_jsonl(tmp_path / "unreadable.jsonl", [_row(["images/broken.png"])])
    _assert_one_line_exit_2(_inspect(in_process, unreadable), f"{unreadable}:1", "cannot be read", "PNG or JPEG")
    count = _write_jsonl(tmp_path / "count.jsonl", [_row(["images/ok.png"], parts=[{"type": "image"}] * 2)])
    _assert_one_line_exit_2(_inspect(in_process, count), f"{count}:1", "2 image placeholders", "1 image;",
                            "one image per placeholder")
    ok = _write_jsonl(tmp_path / "ok.jsonl", [_row(["images/ok.png"])])
    _assert_one_line_exit_2(_inspect(in_process, ok, "dpokit-tiny-llama"), f"{ok}:1", "text-only model",
                            "vision-language model")
    _assert_one_line_exit_2(_inspect(in_process, ok, "dpokit-tiny-vlm", "--max-length", "20"), f"{ok}:1",
                            "16 image tokens", "--max-length")
    # nothing written beside the data
    after = sorted(p.name for p in tmp_path.rglob("*"))
    assert set(after) - set(before) == {"missing.jsonl", "unreadable.jsonl", "count.jsonl", "ok.jsonl"}

    good = _inspect(in_process, ok, "dpokit-tiny-vlm", "--json")
    assert good.returncode == 0, good.stderr
    report = json.loads(good.stdout)
    assert report["pairs"] == 1 and report["image_sizes"] == {"32x32": 1} and report["image_tokens"] == 16
