"""Our metrics (lmm_ray/metrics.py) equal lmms-eval's own functions on the same predictions.

The presets of the study's held-out sets (skills/benchmarks.yaml) score with our metrics; this is
what makes them equal to the lmms-eval tasks the study used. Inputs are drawn at random from the
shapes real predictions take (numbers with units and percent signs, near-miss strings, letters in
the forms models write them), with a fixed seed. CI installs the lmms-eval extra, so these run
there; without it they are skipped with the reason printed (pytest -ra)."""

from __future__ import annotations

import copy
import random

import pytest

from lmm_ray import lmms_backend
from lmm_ray import metrics as M

pytestmark = pytest.mark.skipif(not lmms_backend.available(),
                                reason=f"the lmms-eval extra is missing: {lmms_backend.INSTALL_HINT}")

N = 3000
WORDS = ["coke", "Coke", "the coke", "pepsi", "two", "2", "tobacco institute", "The Tobacco Institute Inc.",
         "yes", "no", "Yes.", "red", "dr. pepper", "don't", "dont", "a", "an apple", "12:30", "3.5", "N/A", ""]


def _number(rng: random.Random) -> str:
    x = rng.choice([rng.randint(0, 200), round(rng.uniform(0, 100), rng.randint(0, 3)), rng.choice([0, 1, 100])])
    fmt = rng.choice(["{}", "{}%", " {} ", "{}.", "about {}", "${}"])
    return fmt.format(x)


def _near(rng: random.Random, s: str) -> str:
    ops = [lambda t: t.upper(), lambda t: t + rng.choice([".", "!", " ", "s"]), lambda t: " " + t,
           lambda t: t[:-1] if t else t, lambda t: t.replace(" ", "  "), lambda t: t]
    return rng.choice(ops)(s)


def test_anls_equals_lmms_eval():
    from lmms_eval.api.metrics import anls as official

    rng = random.Random(0)
    for _ in range(N):
        answers = [rng.choice(WORDS) or "x" for _ in range(rng.randint(1, 3))]
        pred = _near(rng, rng.choice(answers + WORDS))
        want = official(answers, [pred])["anls"]
        assert M.anls(pred, answers) == pytest.approx(want, abs=1e-12), (pred, answers)


def test_relaxed_accuracy_equals_lmms_eval_chartqa():
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness as official

    rng = random.Random(1)
    for _ in range(N):
        gold = rng.choice([_number(rng).strip(), rng.choice(WORDS) or "x"])
        pred = rng.choice([_near(rng, gold), _number(rng), rng.choice(WORDS)]).strip()
        assert M.relaxed(pred, [gold]) == float(official(pred, gold)), (pred, gold)


def test_vqa_accuracy_equals_lmms_eval_textvqa():
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results as official

    rng = random.Random(2)
    for _ in range(N):
        pool = rng.sample(WORDS[:-1], 3)
        answers = [rng.choice(pool) for _ in range(10)]
        pred = _near(rng, rng.choice(pool + WORDS[:-1]))
        doc = {"answers": copy.copy(answers), "question_id": 0}
        want = official(doc, [pred])["exact_match"]
        assert M.vqa(pred, answers) == pytest.approx(want, abs=1e-12), (pred, answers)


def test_choice_letter_equals_lmms_eval_mcq_extraction():
    """A prediction that names one option letter in the forms models write is read as lmms-eval's
    multiple-choice filter reads it (MMStar / AI2D / SEED in 0.7.3: extract_mcq_answer)."""
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer as official

    rng = random.Random(3)
    options = ["cat", "dog", "bird", "fish"]
    forms = ["{}", "({})", "{}.", "{}:", "Answer: {}", "The answer is {}", "{}. {text}", "({}) {text}"]
    for _ in range(N):
        letter = rng.choice("ABCD")
        text = options["ABCD".index(letter)]
        pred = rng.choice(forms).format(letter, text=text)
        got = M.extract_letter(pred, options)
        assert got == letter == official(pred), (pred, got, official(pred))
