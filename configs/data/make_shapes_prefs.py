"""Writes shapes/: a small image preference set for the tiny vision-language models.

Each image is one coloured shape (square, circle or triangle in red, green, blue or yellow) on a white 32x32
canvas; the prompt asks what the picture shows, the chosen answer names the right colour and shape, the rejected
one a wrong colour or shape. Rows are TRL's vision preference format with image paths relative to the data file
(shapes/shapes_prefs.jsonl, shapes/images/NNNN.png). Deterministic (seeded). Run: python make_shapes_prefs.py [OUT]
"""

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ["square", "circle", "triangle"]
QUESTIONS = ["What is in the picture?", "Describe the shape.", "What do you see?", "Name the colour and the shape."]


def draw(shape: str, colour: str, rng: random.Random, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(img)
    half = rng.randint(8, 12)
    cx, cy = rng.randint(half + 1, size - half - 2), rng.randint(half + 1, size - half - 2)
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[colour]
    if shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "circle":
        pen.ellipse(box, fill=fill)
    else:
        pen.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img


def make(out: Path, n: int = 48, seed: int = 0) -> Path:
    """Write n rows and their images under `out`; returns the jsonl path."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 4]
        name = f"images/{i:04d}.png"
        draw(shape, colour, rng).save(out / name)
        if rng.random() < 0.5:
            wrong_colour, wrong_shape = rng.choice([c for c in COLOURS if c != colour]), shape
        else:
            wrong_colour, wrong_shape = colour, rng.choice([s for s in SHAPES if s != shape])
        rows.append({
            "images": [name],
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": rng.choice(QUESTIONS)}]}],
            "chosen": [{"role": "assistant", "content": f"A {colour} {shape}."}],
            "rejected": [{"role": "assistant", "content": f"A {wrong_colour} {wrong_shape}."}],
        })
    path = out / "shapes_prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "shapes"))
