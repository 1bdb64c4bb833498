"""Answer rules by answer type: how a generated skill's answer is read and compared.

The generated skills are scored by their answer type (`word`, `number`, `yesno`, `choice`,
`time`): a per-type parse of the generated text before comparing it with the gold answer. These
rules are registered as the metrics `typed_<answer type>` (metrics.py), next to the official
benchmark metrics, so saved predictions of any skill can be re-scored by name.
"""

from __future__ import annotations

import re
from typing import Sequence

from lmm_ray.number_words import COUNT_WORDS
from lmm_ray.skills.schema import ANSWER_TYPES  # noqa: F401 - the types these rules cover

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_WORD_VALUE = {w: i for i, w in enumerate(COUNT_WORDS)}  # zero..twenty, as the study's parse_count
# [0-9], not \d: "٣" is not an answer the scorer should read as 3.
_FIRST_NUMBER = re.compile(r"[0-9]+|\b(?:" + "|".join(COUNT_WORDS) + r")\b")
_ARTICLES = {"a", "an", "the"}
_LETTER = re.compile(r"\b([A-Za-z])[.)]?\b")  # the study's cub200 letter regex
_HMM = re.compile(r"([0-9]{1,2})\s*:\s*([0-9]{2})")


def _words(text: str) -> list[str]:
    return [w for w in re.sub(r"[^\w\s]", " ", text.lower()).split() if w not in _ARTICLES]


def _number(text: str) -> str | None:
    m = _FIRST_NUMBER.search(text.lower())
    if m is None:
        return None
    s = m.group(0)
    return str(_WORD_VALUE[s]) if s in _WORD_VALUE else str(int(s))


def _yesno(text: str) -> str | None:
    return next((w for w in _words(text) if w in ("yes", "no")), None)


def _letter(text: str, choices: Sequence[str] = ()) -> str:
    # The option text itself ("zorbil") counts as its letter; checked first because the letter
    # regex would read the article of "a zorbil" as option A.
    norm = " ".join(_words(text))
    for i, c in enumerate(choices):
        if norm and norm == " ".join(_words(c)):
            return LETTERS[i]
    m = _LETTER.search(text)
    if m:
        return m.group(1).upper()
    return text.strip()[:1].upper()


def parse_time(text: str) -> tuple[int, int] | None:
    """(hour on a 12-hour clock, 1..12, minute) from "H:MM", else from the first two integers."""
    m = _HMM.search(text)
    nums = [int(x) for x in (m.groups() if m else re.findall(r"[0-9]+", text)[:2])]
    if len(nums) < 2:
        return None
    h, mi = nums
    return (h % 12 or 12, mi)


def normalize(answer: str, answer_type: str, choices: Sequence[str] = ()) -> str:
    """The canonical form two answers are compared in (falls back to cleaned words)."""
    words = " ".join(_words(answer))
    if answer_type == "number":
        return _number(answer) or words
    if answer_type == "yesno":
        return _yesno(answer) or words
    if answer_type == "choice":
        return _letter(answer, choices)
    if answer_type == "time":
        t = parse_time(answer)
        return f"{t[0]}:{t[1]:02d}" if t else words
    if answer_type == "word":
        return words
    raise ValueError(f"unknown answer_type {answer_type!r}")


def is_correct(pred: str, gold: str, answer_type: str, choices: Sequence[str] = ()) -> bool:
    """Whether a generated answer counts as right.

    time follows the study's TimeClock `both_accuracy`: the hour must match exactly on a
    12-hour clock (0 == 12, 13 == 1) and the minutes differ by <= 1 or by exactly 59. So
    "3:05" ~ "03:04" and "12:00" ~ "12:01" are right, "12:59" vs "1:00" is wrong (the hour
    differs), and "3:00" vs "3:59" is right (the study's wrap-around rule compares minutes
    only). The generated clock uses a 15-minute grid, so none of these edge cases occur there.
    """
    if answer_type == "time":
        p, g = parse_time(pred), parse_time(gold)
        if p is None or g is None:
            return False
        dm = abs(p[1] - g[1])
        return p[0] == g[0] and (dm <= 1 or dm == 59)
    g = normalize(gold, answer_type, choices)
    return bool(g) and normalize(pred, answer_type, choices) == g
