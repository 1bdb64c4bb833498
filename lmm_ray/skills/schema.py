"""The one sample schema shared by generated skills and loaded datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

AnswerType = Literal["word", "number", "yesno", "choice", "time"]
ANSWER_TYPES: tuple[str, ...] = ("word", "number", "yesno", "choice", "time")


@dataclass(frozen=True)
class Sample:
    """One image-question-answer triple.

    `answer` is the text the model must produce (for `choice` samples: the option letter,
    with the option texts in `choices`); `answer_type` picks the normalisation used when
    scoring (see evaluate.py).

    Loaded benchmarks fill three more fields (all optional, after `meta`, so positional call
    sites are unchanged):
      * `answers`: every gold answer (e.g. TextVQA's 10 annotators, DocVQA's alternatives), in
        dataset order, duplicates kept; `answer` is the most common one. Defaults to `(answer,)`.
      * `context`: text shown with the question (ScienceQA's hint), "" if none.
      * `category`: the group a macro average runs over (MMStar's l2_category), "" if none.
    """

    image: Image.Image
    question: str
    answer: str
    answer_type: AnswerType = "word"
    choices: tuple[str, ...] = ()
    skill: str = ""
    id: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    answers: tuple[str, ...] = ()
    context: str = ""
    category: str = ""

    def __post_init__(self):
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(
                f"sample {self.id or '?'}: answer_type {self.answer_type!r} is not one of {ANSWER_TYPES}"
            )
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"sample {self.id or '?'}: answer is empty")
        answers = tuple(self.answers) if self.answers else (self.answer,)
        if not all(isinstance(a, str) for a in answers):
            raise ValueError(f"sample {self.id or '?'}: answers must be strings, got {answers!r:.80}")
        object.__setattr__(self, "answers", answers)  # frozen: set once, here
