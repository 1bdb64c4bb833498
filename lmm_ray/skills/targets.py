"""The five target skills, one per dataset of the study (Zhu et al. 2025).

None of their answers can be produced from the held-out skills: species answers a letter,
count and clock use answer formats or values never paired with such images, texture and
read_word ask about things the held-out skills never show.
"""

from __future__ import annotations

import itertools
import random

from lmm_ray.skills import draw, skill
from lmm_ray.skills.schema import Sample

# --- species (CUB-200 role) ---------------------------------------------------------------
BODY_COLORS = {"rust": (200, 70, 50), "sky": (70, 130, 210), "moss": (90, 160, 70), "sand": (190, 160, 90)}
PATTERNS = ("plain", "stripes", "spots")
HEADS = ("round", "crest")
TAILS = ("fan", "pin")
# One made-up name per attribute combination; names are unrelated to the attributes, like real
# species names, so the mapping has to be learned class by class.
SPECIES_NAMES = (
    "zorbil", "quenda", "marlop", "tibrek", "fennow", "gulvar", "pashik", "dromel",
    "kelvap", "nurift", "sobrak", "vintel", "yarlis", "brunko", "clemat", "dashul",
    "forvin", "gistle", "hobrin", "jaskel", "kolvey", "lumfet", "mirzog", "nolbet",
    "orrick", "pentaw", "quillo", "rasvin", "sindro", "torbek", "umbrik", "velmot",
    "wistal", "xandor", "yelfin", "zaptor", "aldrip", "bekkon", "corvil", "dunmar",
    "eltrop", "farnox", "gavrin", "hesket", "ibrast", "jorvel", "kimbro", "lostan",
)
SPECIES = tuple(itertools.product(BODY_COLORS, PATTERNS, HEADS, TAILS))  # index i is SPECIES_NAMES[i]
assert len(SPECIES) == len(SPECIES_NAMES) == len(set(SPECIES_NAMES))
LETTERS = "ABCD"


@skill("species", kind="target", answer_type="choice", study_role="CUB-200",
       description="4-way choice over 48 made-up species (colour x pattern x head x tail); "
                   "half the option sets differ in only two attributes")
def species(rng: random.Random, size: int) -> Sample:
    true = rng.randrange(len(SPECIES))
    attrs = SPECIES[true]
    # Options must not give the answer away to a text-only model, so every option set is
    # symmetric: either 4 random classes or, half of the time, a fine-grained "square" that
    # varies two attributes (2 x 2 values), so both must be read from the image.
    if rng.random() < 0.5:
        options = [true] + rng.sample([i for i in range(len(SPECIES)) if i != true], 3)
    else:
        a, b = rng.sample(range(4), 2)
        values = (BODY_COLORS, PATTERNS, HEADS, TAILS)
        alt_a = rng.choice([v for v in values[a] if v != attrs[a]])
        alt_b = rng.choice([v for v in values[b] if v != attrs[b]])
        options = []
        for va, vb in itertools.product((attrs[a], alt_a), (attrs[b], alt_b)):
            o = list(attrs)
            o[a], o[b] = va, vb
            options.append(SPECIES.index(tuple(o)))
    rng.shuffle(options)
    color, pattern, head, tail = attrs
    facing = rng.choice((-1, 1))
    scale = rng.uniform(0.9, 1.1)
    cx = size / 2 + rng.uniform(-3, 3) * size / 64
    cy = size * 0.55 + rng.uniform(-3, 3) * size / 64
    im = draw.creature(size, BODY_COLORS[color], pattern, head, tail, facing, cx, cy, scale)
    names = tuple(SPECIES_NAMES[i] for i in options)
    q = "which species is this? " + " ".join(f"{LETTERS[i]}. {n}" for i, n in enumerate(names))
    return Sample(im, q, LETTERS[options.index(true)], "choice", names,
                  meta={"species": SPECIES_NAMES[true], "color": color, "pattern": pattern, "head": head,
                        "tail": tail, "facing": facing})


# --- count (PixMo-Count role) -------------------------------------------------------------
@skill("count", kind="target", answer_type="number", study_role="PixMo-Count",
       description="how many dots (1-6); each dot in its own cell of a 4x4 grid = one image token")
def count(rng: random.Random, size: int) -> Sample:
    n = rng.randint(1, 6)
    cell = size / 4
    im, d = draw.canvas(size)
    dots = []
    for c in rng.sample(range(16), n):
        # Radius <= 5/16 of a cell and jitter <= 2/16: dots never leave their cell or touch.
        r = rng.uniform(3, 5) * size / 64
        j = 2 * size / 64
        cx = (c % 4 + 0.5) * cell + rng.uniform(-j, j)
        cy = (c // 4 + 0.5) * cell + rng.uniform(-j, j)
        draw.shape(d, "circle", cx, cy, r, draw.COLORS[rng.choice(list(draw.COLORS))])
        dots.append((round(cx, 2), round(cy, 2), round(r, 2)))
    return Sample(im, "how many dots are there?", str(n), "number", meta={"n": n, "dots": dots})


# --- texture (PathVQA role) ---------------------------------------------------------------
TEXTURES = {"stripes": "striped", "dots": "dotted", "checks": "checked", "waves": "wavy"}


@skill("texture", kind="target", answer_type="word", study_role="PathVQA",
       description="1/3 yes/no ('is the texture striped?'), 2/3 open ('what texture is this?')")
def texture(rng: random.Random, size: int) -> Sample:
    kind = rng.choice(list(TEXTURES))
    fg = draw.COLORS[rng.choice(list(draw.COLORS))]
    bg = tuple(255 - (255 - c) // 5 for c in fg)  # a pale tint of the same hue, like a stain
    period = round(rng.uniform(10, 14) * size / 64)
    vertical = rng.random() < 0.5
    im = draw.texture(size, kind, period, rng.randrange(period), fg, bg, vertical)
    meta = {"texture": kind, "period": period, "vertical": vertical}
    # Two thirds open questions: then yes, no and each texture name are 1/6 of the answers.
    if rng.random() < 2 / 3:
        return Sample(im, "what texture is this?", kind, "word", meta=meta)
    # Asked texture is the true one half of the time, so yes and no are balanced.
    asked = kind if rng.random() < 0.5 else rng.choice([t for t in TEXTURES if t != kind])
    return Sample(im, f"is the texture {TEXTURES[asked]}?", "yes" if asked == kind else "no", "yesno",
                  meta={**meta, "asked": asked})


# --- read_word (TextVQA role) -------------------------------------------------------------
WORDS = ("cat", "dog", "sun", "map", "cup", "hat", "pen", "key",
         "box", "fish", "bird", "tree", "book", "lamp", "moon", "ship")


@skill("read_word", kind="target", answer_type="word", study_role="TextVQA",
       description="read one of 16 short words rendered in a large font")
def read_word(rng: random.Random, size: int) -> Sample:
    word = rng.choice(WORDS)
    im, d = draw.canvas(size)
    font_px = round(rng.uniform(20, 24) * size / 64)
    while draw.font(font_px).getlength(word) > size - 4:  # long words shrink to fit
        font_px -= 1
    color = tuple(rng.randint(0, 90) for _ in range(3))  # dark ink, strong contrast on white
    dx = min(5 * size / 64, (size - draw.font(font_px).getlength(word)) / 2 - 2)
    cx = size / 2 + rng.uniform(-dx, dx)
    cy = size / 2 + rng.uniform(-12, 12) * size / 64
    draw.text(d, word, cx, cy, font_px, color)
    return Sample(im, "what word is written?", word, "word", meta={"word": word, "font_px": font_px})


# --- clock (TimeClock role) ---------------------------------------------------------------
CLOCK_HOUR_COLOR = draw.BLACK
CLOCK_MINUTE_COLOR = (220, 30, 30)


@skill("clock", kind="target", answer_type="time", study_role="TimeClock",
       description="read an analog clock; minutes on a 15-minute grid (48 times)")
def clock(rng: random.Random, size: int) -> Sample:
    hour, minute = rng.randint(1, 12), rng.choice((0, 15, 30, 45))
    radius = rng.uniform(26, 29) * size / 64
    cx = size / 2 + rng.uniform(-2, 2) * size / 64
    cy = size / 2 + rng.uniform(-2, 2) * size / 64
    im = draw.clock(size, hour, minute, cx, cy, radius, CLOCK_HOUR_COLOR, CLOCK_MINUTE_COLOR)
    return Sample(im, "what time does the clock show?", f"{hour}:{minute:02d}", "time",
                  meta={"hour": hour, "minute": minute, "center": (cx, cy), "radius": radius,
                        "hour_angle": (hour % 12) * 30 + minute * 0.5, "minute_angle": minute * 6})
