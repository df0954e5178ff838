"""A python judge that looks at the picture: does the answer name the colour and the shape in the prompt's image?

For the shapes set (configs/data/make_shapes_prefs.py: one red, green, blue or yellow square, circle or triangle on
a white canvas). The colour is the palette colour nearest to the mean of the non-white pixels; the shape is read
from how much of its bounding box the shape fills (square ~1, circle ~pi/4, triangle ~1/2). Score: +1 for the right
colour named, +1 for the right shape named, -0.5 for each wrong colour or shape word named as well.

dpokit calls a judge function with a third parameter as `score(prompt, response, images)` with the prompt's PIL
images (vision-language runs). Used by configs/tiny-vlm.yaml as `judge: python`,
`judge_options: {function: configs/judges/shapes.py:score}` (the path is relative to the current directory: run
from the repository root).
"""

import re

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("square", "circle", "triangle")


def read_shape(image) -> tuple[str | None, str | None]:
    """(colour, shape) of the one shape on a white canvas; (None, None) for a blank image."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    pixels = rgb.load()
    inked = [(x, y) for y in range(height) for x in range(width) if sum(pixels[x, y]) < 3 * 235]
    if not inked:
        return None, None
    mean = [sum(pixels[x, y][c] for x, y in inked) / len(inked) for c in range(3)]
    colour = min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], mean)))
    xs, ys = [x for x, _ in inked], [y for _, y in inked]
    fill = len(inked) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return colour, shape


def score(prompt, response, images) -> float:
    if not images:
        return 0.0
    colour, shape = read_shape(images[0])
    words = set(re.findall(r"[a-z]+", response.lower()))
    total = 0.0
    for right, every in ((colour, COLOURS), (shape, SHAPES)):
        if right in words:
            total += 1.0
        total -= 0.5 * len([w for w in every if w != right and w in words])
    return total
