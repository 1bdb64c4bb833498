"""Generated skills: registry, determinism, sizes, balance, wording, and answers read back from pixels.

The pixel checks do not call the generators' drawing code: they recover the answer from the
rendered image (connected components, hand angles, hues, bar heights...) and compare.
"""

from __future__ import annotations

import collections
import colorsys
import math
import re

import numpy as np
import pytest
from scipy import ndimage

from lmm_ray import skills

TARGETS = {"species", "count", "texture", "read_word", "clock"}
ALL = skills.target_skills() + skills.heldout_skills()
ANSWER_RE = {
    "word": r"[a-z]+",
    "number": r"\d+",
    "yesno": r"yes|no",
    "choice": r"[A-D]",
    "time": r"(1[0-2]|[1-9]):[0-5]\d",
}
N_BALANCE = 600


@pytest.fixture(scope="module")
def pool():
    """600 samples per skill at 32 px (balance and wording do not depend on the size)."""
    return {name: skills.generate(name, N_BALANCE, seed=7, image_size=32) for name in ALL}


def arr(sample) -> np.ndarray:
    return np.asarray(sample.image.convert("RGB")).astype(int)


def ink(a: np.ndarray, thresh: int = 240) -> np.ndarray:
    """Pixels that are not (near) white."""
    return (a < thresh).any(axis=2)


def saturated(a: np.ndarray) -> np.ndarray:
    mx, mn = a.max(axis=2), a.min(axis=2)
    return (mx - mn) > 0.5 * np.maximum(mx, 1)


def hue_name(rgb) -> str:
    """Colour word from the hue alone (independent of the generator's palette table)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    assert s > 0.5 and v > 0.4, f"not a saturated colour: {rgb}"
    deg = h * 360
    for name, hi in (("red", 15), ("orange", 40), ("yellow", 75), ("green", 165), ("blue", 255), ("purple", 345)):
        if deg < hi:
            return name
    return "red"


def dominant(a: np.ndarray, mask: np.ndarray) -> tuple[int, ...]:
    return collections.Counter(map(tuple, a[mask])).most_common(1)[0][0]


def classify_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    fill = box.mean()
    if fill > 0.9:
        return "square"
    if fill > 0.7:
        return "circle"
    # A triangle's base fills its bottom row; a cross's bottom row is only the vertical arm.
    return "triangle" if box[-1].mean() > 0.8 else "cross"


# --- registry --------------------------------------------------------------------------------
def test_registry_has_five_targets_and_enough_heldout():
    assert set(skills.target_skills()) == TARGETS
    held = skills.heldout_skills()
    assert len(held) >= 8
    types = {skills.get_skill(n).answer_type for n in held}
    assert "number" in types and "yesno" in types
    for n in TARGETS:
        assert skills.get_skill(n).study_role, n


# --- determinism and sizes ---------------------------------------------------------------------
def _fingerprint(samples):
    return [(s.image.tobytes(), s.question, s.answer, s.choices) for s in samples]


@pytest.mark.parametrize("name", ALL)
def test_deterministic_for_a_seed(name):
    a = _fingerprint(skills.generate(name, 6, seed=3))
    assert a == _fingerprint(skills.generate(name, 6, seed=3))
    assert a != _fingerprint(skills.generate(name, 6, seed=4))
    # Images differ between samples of one draw (not one image repeated).
    assert len({f[0] for f in a}) == len(a)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size", [32, 64, 96, 128])
def test_image_sizes(name, size):
    for s in skills.generate(name, 4, seed=0, image_size=size):
        assert s.image.size == (size, size) and s.image.mode == "RGB"
        a = arr(s)
        frac = ink(a).mean()
        assert 0.005 < frac, f"{name}@{size}: almost blank"
        # Nothing is cut by the border except textures (which fill the image by design).
        if name != "texture":
            border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
            assert ink(border[None]).mean() < 0.05, f"{name}@{size}: drawing runs off the image"


# --- answers: balance, format, wording ------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_answer_distribution_balanced(name, pool):
    counts = collections.Counter(s.answer for s in pool[name])
    k = len(counts)
    assert k >= 2
    majority = counts.most_common(1)[0][1] / N_BALANCE
    assert majority <= 1 / k + 0.10, f"{name}: majority answer {counts.most_common(1)} of {k} classes"


@pytest.mark.parametrize("name", ALL)
def test_answer_types_and_format(name, pool):
    spec = skills.get_skill(name)
    for s in pool[name]:
        allowed = {"word", "yesno"} if name == "texture" else {spec.answer_type}
        assert s.answer_type in allowed, (name, s.answer_type)
        assert re.fullmatch(ANSWER_RE[s.answer_type], s.answer), (name, s.answer)
        assert s.skill == name
    if name == "texture":  # both kinds of question are mixed in
        assert {s.answer_type for s in pool[name]} == {"word", "yesno"}


@pytest.mark.parametrize("name", ALL)
def test_question_vocabulary_small(name, pool):
    templates, words = set(), set()
    for s in pool[name]:
        q = s.question
        if s.answer_type == "choice":
            assert len(s.choices) == 4 and len(set(s.choices)) == 4
            for letter, c in zip("ABCD", s.choices):
                assert f"{letter}. {c}" in q
                q = q.replace(f"{letter}. {c}", "<opt>")
        sentence = q.split("?")[0] + "?"  # multiple choice: the options follow the question
        assert q == q.lower() and sentence.endswith("?") and (q == sentence or s.answer_type == "choice"), q
        templates.add(q)
        words.update(re.findall(r"[a-z]+", q))
    assert len(templates) <= 8, f"{name}: {len(templates)} question templates"
    assert len(words) <= 20, f"{name}: {len(words)} question words"


def test_targets_not_answerable_from_heldout(pool):
    held_q = {s.question for n in skills.heldout_skills() for s in pool[n]}
    held_a = collections.Counter(s.answer for n in skills.heldout_skills() for s in pool[n])
    for name in TARGETS:
        assert not held_q & {s.question for s in pool[name]}, name
        # Answering any fixed held-out answer is no better than chance on a target.
        counts = collections.Counter(s.answer for s in pool[name])
        k = len(counts)
        best = max((counts[a] for a in held_a), default=0) / N_BALANCE
        assert best <= 1 / k + 0.10, name


# --- answers read back from the pixels --------------------------------------------------------
SIZES = [64, 96]  # at 32 px hands, waves and small shapes are too few pixels to read back exactly


@pytest.mark.parametrize("size", SIZES)
def test_count_matches_connected_components(size):
    for s in skills.generate("count", 120, seed=1, image_size=size):
        _, n = ndimage.label(ink(arr(s)))
        assert str(n) == s.answer, (s.id, n, s.answer)


def _angle(mask: np.ndarray, cx: float, cy: float) -> float:
    """Clockwise angle from 12 o'clock of the mask's centroid around (cx, cy)."""
    ys, xs = np.nonzero(mask)
    return math.degrees(math.atan2(xs.mean() - cx, -(ys.mean() - cy))) % 360


def _reach(mask: np.ndarray, cx: float, cy: float) -> float:
    ys, xs = np.nonzero(mask)
    return float(np.hypot(xs - cx, ys - cy).max())


@pytest.mark.parametrize("size", SIZES)
def test_clock_time_from_hand_angles(size):
    for s in skills.generate("clock", 120, seed=1, image_size=size):
        a = arr(s)
        grey = (np.abs(a - 128) < 30).all(axis=2)
        ys, xs = np.nonzero(grey)
        cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2  # centre of the rim
        black = (a < 60).all(axis=2)
        red = (a[..., 0] > 180) & (a[..., 1] < 80) & (a[..., 2] < 80)
        m_ang, h_ang = _angle(red, cx, cy), _angle(black, cx, cy)
        snapped = 90 * round(m_ang / 90)  # minutes are multiples of 15: the hand is on a quarter
        assert abs(m_ang - snapped) < 8, (s.id, m_ang)
        minute = snapped // 6 % 60
        hour = round((h_ang - minute * 0.5) / 30) % 12 or 12
        assert f"{hour}:{minute:02d}" == s.answer, (s.id, h_ang, m_ang, s.answer)
        # The hands differ in length: the minute hand reaches much further out.
        assert _reach(red, cx, cy) > 1.4 * _reach(black, cx, cy), s.id


@pytest.mark.parametrize("size", SIZES)
def test_color_is_the_dominant_hue(size):
    for s in skills.generate("color", 100, seed=1, image_size=size):
        a = arr(s)
        assert hue_name(dominant(a, ink(a))) == s.answer, s.id


@pytest.mark.parametrize("size", SIZES)
def test_position_from_centroid(size):
    for s in skills.generate("position", 100, seed=1, image_size=size):
        xs = np.nonzero(ink(arr(s)))[1]
        side = "left" if xs.mean() < size / 2 else "right"
        assert side == s.answer, s.id
        assert abs(xs.mean() - size / 2) > size / 8, f"{s.id}: too close to the middle"


@pytest.mark.parametrize("size", SIZES)
def test_size_from_area(size):
    for s in skills.generate("size", 100, seed=1, image_size=size):
        frac = ink(arr(s)).mean()
        assert ("big" if frac > 0.12 else "small") == s.answer, (s.id, frac)
        assert frac > 0.15 or frac < 0.08, f"{s.id}: big/small not salient ({frac:.3f})"


@pytest.mark.parametrize("size", SIZES)
def test_shape_and_presence_from_silhouette(size):
    for s in skills.generate("shape", 100, seed=1, image_size=size):
        assert classify_shape(ink(arr(s))) == s.answer, s.id
    for s in skills.generate("presence", 100, seed=1, image_size=size):
        asked = re.fullmatch(r"is there a ([a-z]+) in the image\?", s.question).group(1)
        present = classify_shape(ink(arr(s))) == asked
        assert ("yes" if present else "no") == s.answer, s.id


@pytest.mark.parametrize("size", SIZES)
def test_bar_value_from_bar_height_and_ticks(size):
    for s in skills.generate("bar_value", 100, seed=1, image_size=size):
        a = arr(s)
        grey = (np.abs(a - 128) < 30).all(axis=2)
        axis_x = int(np.argmax(grey.sum(axis=0)))  # the vertical axis is the greyest column
        base = int(np.argmax(grey.sum(axis=1)))  # the baseline is the greyest row
        ticks = np.nonzero(grey[:, : max(1, axis_x - 1)].any(axis=1))[0]  # rows with a tick left of the axis
        groups = np.split(ticks, np.nonzero(np.diff(ticks) > 1)[0] + 1)  # a thick tick spans several rows
        centres = [g.mean() for g in groups]
        assert len(centres) == 5, (s.id, centres)
        unit = float(np.median(np.diff(centres)))
        bar = saturated(a)
        top = np.nonzero(bar.any(axis=1))[0].min()
        value = round((base - top) / unit)
        assert str(value) == s.answer, (s.id, base, top, unit, s.answer)


@pytest.mark.parametrize("size", SIZES)
def test_tallest_bar_from_bar_heights(size):
    for s in skills.generate("tallest_bar", 100, seed=1, image_size=size):
        a = arr(s)
        labels, n = ndimage.label(saturated(a))
        assert n == 3, s.id
        bars = []
        for i in range(1, n + 1):
            ys, xs = np.nonzero(labels == i)
            bars.append((ys.max() - ys.min() + 1, hue_name(tuple(a[ys[0], xs[0]]))))
        bars.sort(reverse=True)
        assert bars[0][1] == s.answer, (s.id, bars)
        assert bars[0][0] > 1.5 * bars[1][0], f"{s.id}: tallest bar not salient {bars}"


@pytest.mark.parametrize("size", SIZES)
def test_arrow_direction_from_head_mass(size):
    for s in skills.generate("arrow", 100, seed=1, image_size=size):
        ys, xs = np.nonzero(ink(arr(s)))
        # The wide head pulls the centroid off the bounding-box centre towards the tip.
        dx = xs.mean() - (xs.min() + xs.max()) / 2
        dy = ys.mean() - (ys.min() + ys.max()) / 2
        got = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert got == s.answer, (s.id, dx, dy)


def _texture_kind(a: np.ndarray) -> str:
    fg = saturated(a)  # the background is a pale tint, the pattern a saturated colour
    if (a == a[:, :1]).all() or (a == a[:1]).all():
        return "stripes"  # every row (or every column) is one colour
    empty_row, empty_col = not fg.any(axis=1).all(), not fg.any(axis=0).all()
    if not empty_row and not empty_col:
        return "checks"
    # Dots leave gaps both ways; a wave line crosses every column (or row) it runs along.
    return "dots" if empty_row and empty_col else "waves"


@pytest.mark.parametrize("size", SIZES)
def test_texture_from_pixels(size):
    names = {"stripes": "striped", "dots": "dotted", "checks": "checked", "waves": "wavy"}
    for s in skills.generate("texture", 120, seed=1, image_size=size):
        kind = _texture_kind(arr(s))
        if s.answer_type == "word":
            assert kind == s.answer, (s.id, kind)
        else:
            asked = re.fullmatch(r"is the texture ([a-z]+)\?", s.question).group(1)
            assert ("yes" if names[kind] == asked else "no") == s.answer, (s.id, kind, asked)


def test_species_options_fine_grained_and_body_colour():
    from lmm_ray.skills.targets import BODY_COLORS, SPECIES, SPECIES_NAMES

    attrs = dict(zip(SPECIES_NAMES, SPECIES))
    assert len(SPECIES_NAMES) >= 24

    def dist(x, y):
        return sum(p != q for p, q in zip(attrs[x], attrs[y]))

    samples = skills.generate("species", 400, seed=1, image_size=64)
    squares = text_only_hits = 0
    for s in samples:
        true = s.choices["ABCD".index(s.answer)]
        assert [dist(c, true) for c in s.choices].count(0) == 1, s.id
        squares += sorted(dist(c, true) for c in s.choices) == [0, 1, 1, 2]
        # A text-only shortcut: pick the option closest to all others in attribute space.
        guess = min(s.choices, key=lambda c: sum(dist(c, o) for o in s.choices))
        text_only_hits += guess == true
        a = arr(s)
        assert dominant(a, ink(a)) == BODY_COLORS[attrs[true][0]], s.id  # the body is the biggest area
    assert squares >= 0.35 * len(samples), "too few fine-grained (two-attribute) option sets"
    assert text_only_hits <= 0.32 * len(samples), "the options give the answer away"


def test_read_word_ink_inside_and_answers_from_list():
    from lmm_ray.skills.targets import WORDS

    for s in skills.generate("read_word", 60, seed=1, image_size=64):
        assert s.answer in WORDS
        m = ink(arr(s), 200)
        ys, xs = np.nonzero(m)
        assert xs.min() > 0 and xs.max() < 63 and ys.min() > 0 and ys.max() < 63
        assert ys.max() - ys.min() >= 10, f"{s.id}: text too small to read"
