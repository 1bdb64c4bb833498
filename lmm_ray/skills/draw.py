"""Drawing helpers shared by the generated skills.

Geometry is written for a 64 px image and scaled with `px`, so every skill works at any
image size. Shapes are drawn without anti-aliasing (PIL's default for polygons/ellipses), so
their pixels keep the exact palette colour, which the tests use to read answers back.
"""

from __future__ import annotations

import functools
import math

from PIL import Image, ImageDraw, ImageFont

BASE = 64  # geometry constants below are in pixels of a 64 px image
WHITE = (255, 255, 255)
GREY = (128, 128, 128)
BLACK = (0, 0, 0)

# Six hues far apart, all saturated, so a colour is recognisable from any single pixel.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")


def px(v: float, size: int, minimum: int = 1) -> int:
    """A length given for a 64 px image, scaled to `size`."""
    return max(minimum, round(v * size / BASE))


def canvas(size: int, bg=WHITE) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", (size, size), bg)
    return im, ImageDraw.Draw(im)


def shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    """A filled shape of half-width r centred on (cx, cy)."""
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "cross":
        w = max(1, round(r / 3))
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def arrow(d: ImageDraw.ImageDraw, direction: str, cx: float, cy: float, length: float, shaft: float,
          head_w: float, head_len: float, fill) -> None:
    """An arrow centred on (cx, cy): a thin shaft and a wide triangular head at the pointing end."""
    ux, uy = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}[direction]
    vx, vy = -uy, ux  # perpendicular
    tail = (cx - ux * length / 2, cy - uy * length / 2)
    tip = (cx + ux * length / 2, cy + uy * length / 2)
    neck = (tip[0] - ux * head_len, tip[1] - uy * head_len)
    h = shaft / 2
    d.polygon([(tail[0] + vx * h, tail[1] + vy * h), (neck[0] + vx * h, neck[1] + vy * h),
               (neck[0] - vx * h, neck[1] - vy * h), (tail[0] - vx * h, tail[1] - vy * h)], fill=fill)
    hw = head_w / 2
    d.polygon([tip, (neck[0] + vx * hw, neck[1] + vy * hw), (neck[0] - vx * hw, neck[1] - vy * hw)], fill=fill)


@functools.lru_cache(maxsize=64)
def font(size_px: int) -> ImageFont.FreeTypeFont:
    # Pillow >= 10.1 ships a scalable default font, so no font file is needed.
    return ImageFont.load_default(size=size_px)


def text(d: ImageDraw.ImageDraw, s: str, cx: float, cy: float, size_px: int, fill) -> None:
    d.text((cx, cy), s, font=font(size_px), fill=fill, anchor="mm")


def texture(size: int, kind: str, period: int, phase: int, fg, bg, vertical: bool = False) -> Image.Image:
    """A texture filling the whole image; `period` and `phase` are in pixels of this image.

    `vertical` turns stripes and waves by 90 degrees (checks and dots look alike either way).
    """
    im, d = canvas(size, bg)
    half = max(1, period // 2)
    if kind == "stripes":
        for y in range(-period + phase % period, size, period):
            d.rectangle([0, y, size, y + half - 1], fill=fg)
    elif kind == "checks":
        for gy, y in enumerate(range(-period + phase % period, size, half)):
            for gx, x in enumerate(range(-period + phase % period, size, half)):
                if (gx + gy) % 2 == 0:
                    d.rectangle([x, y, x + half - 1, y + half - 1], fill=fg)
    elif kind == "dots":
        r = max(1, period // 4)
        for y in range(-period + phase % period, size + period, period):
            for x in range(-period + phase % period, size + period, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=fg)
    elif kind == "waves":
        amp, thick = period / 4, max(1, period // 3)
        for y0 in range(-period + phase % period, size + period, period):
            for x in range(size):
                y = y0 + amp * math.sin(2 * math.pi * x / (2 * period))
                d.rectangle([x, round(y), x, round(y) + thick - 1], fill=fg)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return im.transpose(Image.Transpose.TRANSPOSE) if vertical else im


def hand_end(cx: float, cy: float, angle_deg: float, length: float) -> tuple[float, float]:
    """End point of a clock hand; angle 0 is 12 o'clock, clockwise."""
    a = math.radians(angle_deg)
    return cx + length * math.sin(a), cy - length * math.cos(a)


def clock(size: int, hour: int, minute: int, cx: float, cy: float, radius: float,
          hour_color, minute_color, face_color=GREY) -> Image.Image:
    """An analog clock: grey rim and ticks, a short thick hour hand, a long thin minute hand."""
    im, d = canvas(size)
    rim = px(2, size)
    d.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=face_color, width=rim)
    for k in range(12):
        a, b = hand_end(cx, cy, k * 30, radius * 0.78), hand_end(cx, cy, k * 30, radius - rim)
        d.line([a, b], fill=face_color, width=px(2 if k % 3 == 0 else 1, size))
    minute_angle = minute * 6
    hour_angle = (hour % 12) * 30 + minute * 0.5
    # Minute hand first so the thick hour hand stays whole where they overlap.
    d.line([(cx, cy), hand_end(cx, cy, minute_angle, radius * 0.85)], fill=minute_color, width=px(2, size))
    d.line([(cx, cy), hand_end(cx, cy, hour_angle, radius * 0.5)], fill=hour_color, width=px(5, size, 2))
    return im


def creature(size: int, body_color, pattern: str, head: str, tail: str, facing: int,
             cx: float, cy: float, scale: float) -> Image.Image:
    """A bird-like creature for the species skill: body, patterned or plain, head and tail kinds."""
    im, d = canvas(size)
    k = size / BASE * scale
    rx, ry = 15 * k, 10 * k
    dark = tuple(c // 3 for c in body_color)
    # Tail behind the body, on the side away from the head.
    tx = cx - facing * rx * 0.8
    if tail == "fan":
        d.polygon([(tx, cy), (tx - facing * 12 * k, cy - 9 * k), (tx - facing * 12 * k, cy + 9 * k)], fill=dark)
    else:  # "pin": a long thin tail
        d.rectangle(sorted_box(tx, cy - 1.5 * k, tx - facing * 16 * k, cy + 1.5 * k), fill=dark)
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=body_color)
    if pattern == "stripes":
        for i in (-1, 0, 1):
            x = cx + i * 7 * k
            d.rectangle([x - 1.5 * k, cy - ry * 0.75, x + 1.5 * k, cy + ry * 0.75], fill=dark)
    elif pattern == "spots":
        for ox, oy in ((-7, -3), (0, 3), (7, -3)):
            d.ellipse([cx + ox * k - 2.5 * k, cy + oy * k - 2.5 * k, cx + ox * k + 2.5 * k, cy + oy * k + 2.5 * k],
                      fill=dark)
    hx, hy, hr = cx + facing * (rx + 3 * k), cy - ry * 0.8, 7 * k
    if head == "crest":
        d.polygon([(hx - 3 * k, hy - hr * 0.6), (hx + 3 * k, hy - hr * 0.6), (hx - facing * 3 * k, hy - hr * 1.8)],
                  fill=dark)
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=body_color)
    d.polygon([(hx + facing * hr * 0.8, hy - 2.5 * k), (hx + facing * hr * 0.8, hy + 2.5 * k),
               (hx + facing * (hr + 5 * k), hy)], fill=(240, 170, 0))  # beak
    d.ellipse([hx - 1.5 * k, hy - 2.5 * k, hx + 1.5 * k, hy + 0.5 * k], fill=BLACK)
    return im


def sorted_box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
