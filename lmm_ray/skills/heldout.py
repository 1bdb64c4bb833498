"""Held-out general skills: what the tiny model is pre-trained on and must not forget.

Each must reach >= 90% after a few thousand pre-training steps of a ~1.5M-parameter model
seeing 16 image tokens, so objects are big, contrast is strong and every question is about a
single object or about one very salient difference (the prior probe's two-object relational
question stayed at chance).
"""

from __future__ import annotations

import random

from lmm_ray.skills import draw, skill
from lmm_ray.skills.draw import COLORS, SHAPES, px
from lmm_ray.skills.schema import Sample


def _one_shape(rng: random.Random, size: int, r_lo: float, r_hi: float):
    """A random palette shape of radius r_lo..r_hi (64 px units) anywhere fully inside the image."""
    color, kind = rng.choice(list(COLORS)), rng.choice(SHAPES)
    r = rng.uniform(r_lo, r_hi) * size / 64
    cx, cy = rng.uniform(r + 1, size - r - 2), rng.uniform(r + 1, size - r - 2)
    im, d = draw.canvas(size)
    draw.shape(d, kind, cx, cy, r, COLORS[color])
    return im, {"color": color, "shape": kind, "cx": cx, "cy": cy, "r": r}


@skill("color", kind="heldout", answer_type="word", description="colour of a single shape (6 colours)")
def color(rng: random.Random, size: int) -> Sample:
    im, meta = _one_shape(rng, size, 9, 16)
    return Sample(im, "what color is the shape?", meta["color"], "word", meta=meta)


@skill("shape", kind="heldout", answer_type="word", description="circle, square, triangle or cross")
def shape(rng: random.Random, size: int) -> Sample:
    im, meta = _one_shape(rng, size, 10, 16)
    return Sample(im, "what shape is this?", meta["shape"], "word", meta=meta)


@skill("position", kind="heldout", answer_type="word", description="single shape in the left or right third")
def position(rng: random.Random, size: int) -> Sample:
    side = rng.choice(("left", "right"))
    color, kind = rng.choice(list(COLORS)), rng.choice(SHAPES)
    r = rng.uniform(6, 10) * size / 64
    # A gap of a whole token column around the middle keeps the side unambiguous.
    lo, hi = (r + 1, size * 0.34) if side == "left" else (size * 0.66, size - r - 2)
    cx, cy = rng.uniform(lo, hi), rng.uniform(r + 1, size - r - 2)
    im, d = draw.canvas(size)
    draw.shape(d, kind, cx, cy, r, COLORS[color])
    return Sample(im, "is the shape on the left or right?", side, "word",
                  meta={"side": side, "color": color, "shape": kind, "cx": cx, "cy": cy, "r": r})


@skill("size", kind="heldout", answer_type="word", description="one shape, big (r 18-24) or small (r 5-8)")
def size_(rng: random.Random, size: int) -> Sample:
    big = rng.random() < 0.5
    im, meta = _one_shape(rng, size, *((18, 24) if big else (5, 8)))
    return Sample(im, "is the shape big or small?", "big" if big else "small", "word", meta=meta)


@skill("tallest_bar", kind="heldout", answer_type="word",
       description="three coloured bars; the tallest reaches the top quarter, the others stay in the bottom half")
def tallest_bar(rng: random.Random, size: int) -> Sample:
    colors = rng.sample(list(COLORS), 3)
    tallest = rng.randrange(3)
    base = size - px(3, size)
    heights = [rng.uniform(44, 54) if i == tallest else rng.uniform(8, 28) for i in range(3)]
    heights = [h * size / 64 for h in heights]
    im, d = draw.canvas(size)
    w = px(14, size)
    for i, (c, h) in enumerate(zip(colors, heights)):
        x = round((i + 0.5) * size / 3 - w / 2)
        d.rectangle([x, round(base - h), x + w - 1, base - 1], fill=COLORS[c])
    return Sample(im, "which bar is the tallest?", colors[tallest], "word",
                  meta={"colors": colors, "heights": heights, "base": base})


@skill("arrow", kind="heldout", answer_type="word", description="which way a big arrow points")
def arrow(rng: random.Random, size: int) -> Sample:
    direction = rng.choice(("up", "down", "left", "right"))
    color = rng.choice(list(COLORS))
    k = size / 64
    length = rng.uniform(38, 46) * k
    cx, cy = size / 2 + rng.uniform(-6, 6) * k, size / 2 + rng.uniform(-6, 6) * k
    im, d = draw.canvas(size)
    draw.arrow(d, direction, cx, cy, length, shaft=6 * k, head_w=24 * k, head_len=15 * k, fill=COLORS[color])
    return Sample(im, "which way does the arrow point?", direction, "word",
                  meta={"direction": direction, "color": color, "cx": cx, "cy": cy, "length": length})


@skill("presence", kind="heldout", answer_type="yesno", description="is there a <shape>? (one shape drawn)")
def presence(rng: random.Random, size: int) -> Sample:
    im, meta = _one_shape(rng, size, 10, 16)
    present = rng.random() < 0.5
    asked = meta["shape"] if present else rng.choice([s for s in SHAPES if s != meta["shape"]])
    return Sample(im, f"is there a {asked} in the image?", "yes" if present else "no", "yesno",
                  meta={**meta, "asked": asked})


@skill("bar_value", kind="heldout", answer_type="number",
       description="one bar against a 1-5 tick scale; answer the value as a digit")
def bar_value(rng: random.Random, size: int) -> Sample:
    value = rng.randint(1, 5)
    color = rng.choice(list(COLORS))
    unit, base, axis_x = px(10, size, 3), size - px(6, size), px(10, size)
    im, d = draw.canvas(size)
    line = px(1, size)
    d.line([(axis_x, base - 5 * unit - px(3, size)), (axis_x, base)], fill=draw.GREY, width=line)
    d.line([(axis_x, base), (size - 1, base)], fill=draw.GREY, width=line)
    for v in range(1, 6):  # ticks left of the axis at every unit
        d.line([(axis_x - px(5, size, 2), base - v * unit), (axis_x - 1, base - v * unit)], fill=draw.GREY, width=line)
    w = round(rng.uniform(14, 22) * size / 64)
    x = rng.randint(axis_x + px(6, size), size - px(3, size) - w)
    d.rectangle([x, base - value * unit, x + w - 1, base - 1], fill=COLORS[color])
    return Sample(im, "what is the value of the bar?", str(value), "number",
                  meta={"value": value, "color": color, "unit": unit, "base": base, "x": x, "w": w})
