"""`dpokit label serve` with images (issue 29): vision rows (a vision run's eval_samples.jsonl, or prompt + responses
+ images) show the prompt's picture, the DB keeps each item's image files, and the export writes them back so the
labels train again as vision data. Real server (subprocess), real Chromium, real SQLite; no mocks."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from dpokit.core.errors import UserError
from dpokit.label.export import export_labels
from dpokit.label.source import read_source
from dpokit.label.store import open_store
from test_label import make_browser, post, server, wait_until, write_jsonl

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50)}


def vision_prompt(text: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [*[{"type": "image"}] * n_images, {"type": "text", "text": text}]}]


def vision_source(tmp_path: Path) -> Path:
    """Three eval_samples-shaped rows (base vs tuned) and one prompt + responses row, images relative to the file."""
    (tmp_path / "pics").mkdir()
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(tmp_path / "pics" / f"{name}.png")
        rows.append({"prompt": vision_prompt("What colour is it?"), "base": "It is purple.",
                     "tuned": f"It is {name}.", "images": [f"pics/{name}.png"]})
    rows.append({"prompt": vision_prompt("Compare <them>.", 2), "responses": ["Red, then blue.", "Two greens."],
                 "images": ["pics/red.png", str(tmp_path / "pics" / "blue.png")]})
    return write_jsonl(tmp_path / "samples.jsonl", rows)


def test_vision_source_items_keep_absolute_image_paths(tmp_path):
    items, skipped = read_source(vision_source(tmp_path))
    assert skipped == 0 and len(items) == 4
    assert items[0].images == [str((tmp_path / "pics" / "red.png").resolve())]
    assert items[3].images == [str((tmp_path / "pics" / n).resolve()) for n in ("red.png", "blue.png")]
    text_row = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "What does <image> mean in HTML?",
                                                      "responses": ["A tag.", "Nothing."]}])
    assert read_source(text_row)[0][0].images == []  # a text prompt may mention <image>


@pytest.mark.parametrize("row, needles", [
    ({"prompt": vision_prompt("What?"), "responses": ["a", "b"], "images": ["pics/gone.png"]},
     ["image 'pics/gone.png' not found", "relative to the source file's folder"]),
    ({"prompt": vision_prompt("What?", 2), "responses": ["a", "b"], "images": ["pics/red.png"]},
     ["2 image placeholder(s)", "1 image(s)", "one image per placeholder"]),
    ({"prompt": vision_prompt("What?"), "responses": ["a", "b"]}, ["1 image placeholder(s)", "0 image(s)"]),
    ({"prompt": vision_prompt("What?"), "responses": ["a", "b"], "images": "pics/red.png"},
     ["'images' must be a list of image file paths"]),
    ({"prompt": vision_prompt("What?"), "responses": ["a", "b"], "images": ["pics/notes.png"]},
     ["image 'pics/notes.png' cannot be read", "PNG or JPEG"]),
])
def test_bad_vision_rows_name_the_line_and_leave_no_db(tmp_path, row, needles):
    vision_source(tmp_path)
    (tmp_path / "pics" / "notes.png").write_text("not an image")
    source = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok?", "responses": ["yes", "no"]}, row])
    with pytest.raises(UserError) as err:
        open_store(tmp_path / "labels.sqlite", source)
    message = str(err.value)
    assert "\n" not in message and f"{source}:2" in message and all(n in message for n in needles), message
    assert not (tmp_path / "labels.sqlite").exists()


def test_export_keeps_images_and_the_pairs_train_again_as_vision_data(tmp_path):
    from dpokit.data.vision import load_vision_preferences

    db = tmp_path / "labels.sqlite"
    store = open_store(db, vision_source(tmp_path))
    try:
        while (shown := store.next_item("ann")) is not None:
            store.answer("ann", shown.item, "left" if "purple" not in shown.left else "right")
    finally:
        store.close()
    out = tmp_path / "pairs.jsonl"
    assert export_labels(db, out)["pairs"] == 4
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["images"] for p in pairs[:3]] == [[str((tmp_path / "pics" / f"{n}.png").resolve())] for n in COLOURS]
    assert all("purple" not in p["chosen"][0]["content"] for p in pairs[:3])
    data = load_vision_preferences("dpokit-tiny-vlm", source=out, max_length=256)  # the vision loader reads it
    assert len(data.rows) == 4 and data.formats == ["vision"] and data.image_tokens == 5 * 16


def test_a_db_from_before_images_opens_and_exports(tmp_path):
    """A label DB written before items had an images column (text items only) still serves and exports."""
    source = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "Hi?", "responses": ["Hello!", "Go away."]}])
    db = tmp_path / "old.sqlite"
    open_store(db, source).close()
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE items DROP COLUMN images")
    conn.commit()
    conn.close()
    store = open_store(db, source)
    try:
        shown = store.next_item("ann")
        assert shown.images == []
        store.answer("ann", shown.item, "tie")
    finally:
        store.close()
    assert export_labels(db, tmp_path / "out.jsonl")["pairs"] == 0


def test_browser_shows_the_prompt_image_and_the_label_keeps_its_ref(tmp_path):
    """The page shows each vision item's picture (loaded: naturalWidth > 0, alt text), the API hands images only as
    data URIs (no file route), a submitted label is committed, and the export names the image file."""
    source, db = vision_source(tmp_path), tmp_path / "labels.sqlite"
    driver = make_browser()
    try:
        with server(source, db) as (url, _):
            status, data = post(url, "next", {"annotator": "probe"})
            assert status == 200 and all(im["src"].startswith("data:image/png;base64,")
                                         for im in data["item"]["images"])
            driver.get(f"{url}/?annotator=alice")
            item = wait_until(driver, "ready")  # the probe holds item 0 (red): alice is shown item 1
            colour = list(COLOURS)[int(item)]
            images = driver.find_elements("css selector", '[data-role="images"] img[data-role="prompt-image"]')
            assert len(images) == 1 and images[0].is_displayed()
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0]) == 32
            assert images[0].get_attribute("alt") == f"prompt image {colour}.png"
            prompt = driver.find_element("css selector", '[data-role="prompt"]').text
            assert "[image 1]" in prompt and "What colour is it?" in prompt
            left = driver.find_element("css selector", '[data-side="left"]').text
            driver.find_element("css selector", 'button[data-key="1"]').click()
            wait_until(driver, "ready", not_item=item)
            assert driver.get_log("browser") == []
    finally:
        driver.quit()
    conn = sqlite3.connect(db)
    try:
        (choice,) = conn.execute("SELECT choice FROM labels WHERE annotator = 'alice'").fetchone()
    finally:
        conn.close()
    assert choice in ("first", "second")
    out = tmp_path / "pairs.jsonl"
    res = run_cli("label", "export", db, "--out", out)
    assert res.returncode == 0, res.stderr
    (pair,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert pair["images"] == [str((tmp_path / "pics" / f"{colour}.png").resolve())]
    assert pair["chosen"] == [{"role": "assistant", "content": left}]
    assert pair["prompt"] == vision_prompt("What colour is it?")
