"""metrics.py and score.py: every metric against values worked out by hand from the official
definitions (lmms-eval and the study fork; see the docstrings in lmm_ray/metrics.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmm_ray import metrics as M
from lmm_ray import cli
from lmm_ray import score as S
from lmm_ray.registry import UnknownName

ROOT = Path(__file__).resolve().parents[1]
FOUR = ["dog", "cat", "bird", "fish"]
LETTERS26 = [f"option {i}" for i in range(26)]


def approx(x):
    return pytest.approx(x, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# exact


@pytest.mark.parametrize("pred, answers, expected", [
    ("Paris.", ["paris"], 1.0),          # lower + trailing period
    ("  PARIS ", ["Paris"], 1.0),        # strip
    ("Paris .", ["paris"], 1.0),         # "paris ." -> "paris " -> "paris"
    ("the Paris", ["Paris"], 0.0),       # articles are kept
    ("Paris!", ["paris"], 0.0),          # only periods are dropped
    ("New  York", ["new york"], 0.0),    # inner whitespace is kept
    ("london", ["Paris", "London"], 1.0),  # any answer
    ("A", ["A"], 1.0),                   # a one-letter gold is not an article here
    ("a", ["A"], 1.0),
    ("", ["x"], 0.0),
    ("x", [], 0.0),                      # no answers: 0
])
def test_exact(pred, answers, expected):
    assert M.exact(pred, answers, None) == expected


# ---------------------------------------------------------------------------------------------
# choice


@pytest.mark.parametrize("pred, expected", [
    ("A", 1.0),
    ("(a)", 1.0),        # a lone letter in any case, bracketed or not
    ("a", 1.0),
    ("A. dog", 1.0),     # "A" opens the answer (start format)
    ("dog", 1.0),        # option text -> its letter
    ("Dog.", 1.0),       # option text, case and punctuation ignored
    ("B", 0.0),
    ("(B)", 0.0),
    ("", 0.0),
])
def test_choice_gold_a(pred, expected):
    # The old evaluate.normalize dropped the article "a", so gold "A" could never be right.
    assert M.choice(pred, ["A"], FOUR) == expected


@pytest.mark.parametrize("pred", ["B", "(B)", "B.", "B:", "B: cat", "Answer: B", "B)",
                                  "The answer is (B).", "the answer is B", "cat", "I think B"])
def test_choice_formats_give_b(pred):
    assert M.extract_letter(pred, FOUR) == "B"
    assert M.choice(pred, ["B"], FOUR) == 1.0
    assert M.choice(pred, ["A"], FOUR) == 0.0


def test_choice_i_think_b_depends_on_the_options():
    # lmms-eval's extract_mcq_answer ranks a letter that *opens* the answer (priority 10) over
    # one that closes it (9). With four options "I" is no option, so "B" (closing) wins; with 26
    # options "I" is one and opens "I think B", so it is read as I. Without choices: A-H.
    assert M.extract_letter("I think B", FOUR) == "B"
    assert M.extract_letter("I think B", LETTERS26) == "I"
    assert M.extract_letter("I think B", None) == "B"


def test_choice_articles_and_last_resort():
    # "a dog": no upper-case letter, so the option text "dog" decides -> B, never A
    assert M.extract_letter("a dog", ["cat", "dog"]) == "B"
    # an option that itself starts with an article is matched whole, before any letter rule
    assert M.extract_letter("A dog", ["a cat", "a dog"]) == "B"
    # but "A big dog" opens with a standalone capital A: lmms-eval reads that as option A
    assert M.extract_letter("A big dog", ["cat", "dog"]) == "A"
    # "B or C": B opens (10) and C closes (9) the answer: B
    assert M.extract_letter("B or C", FOUR) == "B"
    # the longest option at the leftmost position: "hot dog" over "dog"
    assert M.extract_letter("a hot dog", ["dog", "hot dog"]) == "B"
    assert M.extract_letter("the hot dog", ["hot", "hot dog"]) == "B"  # same position: longer
    # last resort as lmms-eval: any upper-case valid letter, the last one ("D" of "Dog")
    assert M.extract_letter("Dog", ["cat", "mouse", "rat", "owl"]) == "D"
    assert M.extract_letter("nothing here", FOUR) == ""


def test_choice_gold_forms():
    # AI2D/ScienceQA: a digit gold is a 0-based index, even when the options are digits
    digits = ["1", "2", "3", "4"]
    assert M.choice("B", ["1"], digits) == 1.0
    assert M.choice("1", ["1"], digits) == 0.0   # "1" is the text of option A
    assert M.choice("2", ["1"], digits) == 1.0   # option text "2" is B
    assert M.choice("B", ["cat"], FOUR) == 1.0   # option-text gold
    assert M.choice("b", ["(B)"], FOUR) == 1.0
    assert M.choice("B", ["y"], ["x", "y"]) == 1.0  # "y" is no valid letter but option B's text
    # an open-ended gold (RealWorldQA mixes them in) is scored with `exact`
    assert M.choice("Paris.", ["paris"], None) == 1.0
    assert M.choice("Paris is it", ["paris"], None) == 0.0


def test_choice_gold_outside_the_options_is_loud():
    with pytest.raises(ValueError, match="give the record all its choices"):
        M.choice("E", ["E"], FOUR)
    with pytest.raises(ValueError, match="only A-H"):
        M.choice("K", ["K"], None)
    assert M.choice("K", ["K"], LETTERS26) == 1.0


# ---------------------------------------------------------------------------------------------
# anls


@pytest.mark.parametrize("pred, answers, expected", [
    ("ac", ["ab"], 0.5),                  # d=1, len 2: 1 - 1/2 = 0.5, kept (< 0.5 is cut)
    ("abxy", ["abcd"], 0.5),              # d=2, len 4: 0.5
    ("axy", ["abc"], 0.0),                # d=2, len 3: 1/3 < 0.5 -> 0
    ("abxye", ["abcde"], 0.6),            # d=2, len 5: 0.6
    ("The Tobacco Institute Inc.", ["Tobacco Institute"], 1 - 9 / 26),  # delete "the " and " inc."
    ("color", ["hue", "colour"], 1 - 1 / 6),   # best answer: "colour", d=1, len 6
    ("  TOBACCO   institute", ["Tobacco Institute"], 1.0),  # lower, strip, collapse -> d=0
    ("", ["abc"], 0.0),                   # d=3, len 3
    ("", [""], 1.0),                      # length 0: distance ratio 0, similarity 1
    ("abc", [], 0.0),
    # lmms-eval divides by the *raw* length: "ab " -> "ab", d("ab","ac")=1, max(len "ac", len "ab ")=3
    ("ab ", ["ac"], 1 - 1 / 3),
])
def test_anls(pred, answers, expected):
    assert M.anls(pred, answers, None) == approx(expected)


def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("flaw", "lawn") == 2


# ---------------------------------------------------------------------------------------------
# relaxed (ChartQA)


@pytest.mark.parametrize("pred, gold, expected", [
    ("105", "100", 1.0),     # |105-100|/100 = 0.05 <= 0.05
    ("95", "100", 1.0),
    ("105.1", "100", 0.0),   # 0.051
    ("94.9", "100", 0.0),
    ("1.2", "1.25", 1.0),    # 0.05/1.25 = 0.04
    ("14.5", "14", 1.0),     # 0.5/14 = 0.036
    ("45%", "45%", 1.0),
    ("0.45", "45%", 1.0),    # "45%" is 0.45
    ("46%", "45%", 1.0),     # 0.01/0.45 = 0.022
    ("45", "45%", 0.0),      # 45 vs 0.45
    ("45%", "45", 0.0),      # 0.45 vs 45
    ("0", "0", 1.0),         # gold 0: no ratio, string equality
    ("0.0", "0", 0.0),
    ("Yes", "yes", 1.0),     # text: case-insensitive equality
    ("Yes.", "yes", 0.0),
    ("The answer is 14.", "14", 0.0),
    ("14.", "14", 1.0),      # float("14.") == 14
    ("14\n", "14", 1.0),
])
def test_relaxed(pred, gold, expected):
    assert M.relaxed(pred, [gold], None) == expected


# ---------------------------------------------------------------------------------------------
# vqa (TextVQA)


@pytest.mark.parametrize("k, expected", [
    (0, 0.0),
    (1, 0.3),   # the matching annotator left out: 0/3; the 9 others: 1/3 -> 9*(1/3)/10 = 0.3
    (2, 0.6),   # 2 left out: 1/3 each; 8 others: 2/3 -> (2/3 + 16/3)/10 = 0.6
    (3, 0.9),   # 3 left out: 2/3 each; 7 others: min(1, 3/3) -> (3*(2/3) + 7)/10 = 0.9
    (4, 1.0),   # 4 left out: 3/3; 6 others: min(1, 4/3) = 1 -> 1.0
])
def test_vqa_leave_one_out(k, expected):
    answers = ["coke"] * k + ["pepsi"] * (10 - k)
    assert M.vqa("coke", answers, None) == approx(expected)


@pytest.mark.parametrize("raw, expected", [
    ("The Coke.", "coke"),        # period dropped, article dropped
    ("Two", "2"),                 # number word -> digit
    ("none", "0"),
    ("3.5", "3.5"),               # period before a digit kept
    ("coca-cola", "coca cola"),   # "-" touches no space: replaced by a space
    ("coca - cola", "coca cola"), # " -" occurs: deleted
    ("coca-cola - x", "cocacola x"),  # a "-" touches a space, so *every* "-" is deleted
    ("yes!", "yes"),
    ("Hello, world?", "hello world"),
    ("dont", "don't"),            # contraction restored
    ("it's", "it 's"),            # "'s" split off
    ("x/y", "x y"),
    ("an apple", "apple"),
])
def test_vqa_normalisation(raw, expected):
    assert M.normalize_vqa(raw) == expected


def test_vqa_uses_normalised_answers():
    # "Two" -> "2"; 3 of the 10 annotators said "2" or "two": 0.9 as above
    assert M.vqa("Two", ["2", "two", "2"] + ["3"] * 7, None) == approx(0.9)
    assert M.vqa("the coke.", ["Coke"] * 4 + ["x"] * 6, None) == approx(1.0)
    # a single answer leaves no other annotator: the official code gives 0
    assert M.vqa("coke", ["coke"], None) == 0.0


# ---------------------------------------------------------------------------------------------
# PathVQA


@pytest.mark.parametrize("pred, gold, expected", [
    ("coagulative necrosis", "necrosis", 0.5),   # 1 reference word found / 2 prediction words
    ("necrosis", "coagulative necrosis", 1.0),   # 1 found / 1 prediction word
    ("2 cells", "cells", 1.0),                   # digits are deleted: prediction is "cells"
    ("non-small cell", "non small cell", 0.5),   # "nonsmall cell": only "cell" found, / 2
    ("yes", "Yes", 1.0),
    ("", "necrosis", 0.0),                       # no prediction words
])
def test_pathvqa_exact(pred, gold, expected):
    assert M.pathvqa_exact(pred, [gold], None) == approx(expected)


@pytest.mark.parametrize("pred, gold, expected", [
    ("coagulative necrosis", "necrosis", 2 / 3),  # tp1 fp1 fn0: P 1/2, R 1 -> 2*(1/2)/(3/2)
    ("liver cells", "liver tissue", 0.5),          # tp1 fp1 fn1: P = R = 1/2
    ("no no", "no", 1.0),                          # tp counts the prediction's 2 "no"s, unclipped
    ("no no liver", "no tissue", 2 / 3),           # tp2 fp1 fn1: P = R = 2/3 (clipped tp would give 1/2)
    ("kidney", "liver", 0.0),
    ("", "liver", 0.0),
])
def test_pathvqa_f1(pred, gold, expected):
    assert M.pathvqa_f1(pred, [gold], None) == approx(expected)


def test_pathvqa_yesno():
    assert M.pathvqa_yesno("Yes", ["yes"], None) == 1.0
    assert M.pathvqa_yesno(" no ", ["No"], None) == 1.0
    assert M.pathvqa_yesno("yes.", ["yes"], None) == 0.0      # strict equality
    assert M.pathvqa_yesno("No, there is no necrosis", ["no"], None) == 0.0
    assert M.pathvqa_yesno("necrosis", ["necrosis"], None) is None  # not a yes/no question
    records = [{"prediction": "yes", "answers": ["yes"]}, {"prediction": "yes", "answers": ["no"]},
               {"prediction": "necrosis", "answers": ["necrosis"]}]
    r = M.score(records, "pathvqa_yesno")
    assert (r["score"], r["n"], r["skipped"]) == (50.0, 2, 1)


# ---------------------------------------------------------------------------------------------
# clock (TimeClock)


@pytest.mark.parametrize("pred, gold, both, hour, minute", [
    ("3:45", "03:45", 1, 1, 1),
    ("3:46", "3:45", 1, 1, 1),     # |1| <= 1
    ("3:47", "3:45", 0, 1, 0),     # |2|
    ("3:59", "3:00", 1, 1, 1),     # |59| counts as a wrap
    ("3:58", "3:00", 0, 1, 0),     # |58| does not
    ("4:00", "3:59", 0, 0, 1),     # minute wraps but the hour is compared as written
    ("12:00", "0:00", 0, 0, 1),    # exact hour, not mod 12 (evaluate.py says right)
    ("15:45", "3:45", 0, 0, 1),
    ("The time is 10:05.", "10:05", 1, 1, 1),
    ("3 hours and 45 minutes", "3:45", 1, 1, 1),   # first two integers
    ("3.45", "3:45", 0, 0, 0),     # periods deleted: "345", one number, no time
    ("", "3:45", 0, 0, 0),
])
def test_clock(pred, gold, both, hour, minute):
    assert (M.clock(pred, [gold], None), M.clock_hour(pred, [gold], None),
            M.clock_minute(pred, [gold], None)) == (both, hour, minute)


# ---------------------------------------------------------------------------------------------
# number (PixMo-Count)


@pytest.mark.parametrize("pred, gold, expected", [
    ("seven", "7", 1.0),
    ("There are 7 dots.", "7", 1.0),
    ("07", "7", 1.0),
    ("seventeen", "17", 1.0),     # whole words (the fork's substring replace reads 7)
    ("fourteen", "4", 0.0),       # (the fork reads "4teen" as 4)
    ("someone sees 3", "3", 1.0), # (the fork reads "some1" as 1)
    ("3 or 4", "4", 0.0),         # the first number counts
    ("2.5", "25", 1.0),           # periods deleted, as the fork
    ("banana", "3", 0.0),
    ("banana", "banana", 0.0),    # no number on either side
])
def test_number(pred, gold, expected):
    assert M.number(pred, [gold], None) == expected


# ---------------------------------------------------------------------------------------------
# registry, aggregation, score()

CATEGORY_RECORDS = (
    [{"prediction": "x", "answers": ["x"], "category": "big"}] * 3
    + [{"prediction": "x", "answers": ["y"], "category": "big"},
       {"prediction": "x", "answers": ["y"], "category": "small"}]
)


def test_mean_and_macro_differ_with_unequal_categories():
    # big: 3 of 4 right = 75%; small: 0 of 1. mean = 3/5 = 60; macro = (75 + 0) / 2 = 37.5
    mean = M.score(CATEGORY_RECORDS, "exact")
    macro = M.score(CATEGORY_RECORDS, "exact", aggregation="macro")
    assert mean["score"] == approx(60.0) and macro["score"] == approx(37.5)
    assert mean["n"] == macro["n"] == 5
    assert macro["by_category"] == {"big": {"score": 75.0, "n": 4}, "small": {"score": 0.0, "n": 1}}
    assert set(mean) >= {"metric", "score", "n", "by_category"} and mean["metric"] == "exact"


def test_by_category_leaves_out_records_without_one():
    records = [{"prediction": "x", "answers": ["x"]}, {"prediction": "x", "answers": ["y"], "category": "c"}]
    r = M.score(records, "exact")
    assert r["score"] == 50.0 and r["by_category"] == {"c": {"score": 0.0, "n": 1}}
    assert M.score(records[:1], "exact")["by_category"] == {}


def test_score_errors():
    with pytest.raises(UnknownName, match="Did you mean 'anls'"):
        M.score([], "ansl")
    with pytest.raises(UnknownName, match="mean, macro|macro, mean"):
        M.score([], "exact", aggregation="median")
    with pytest.raises(M.RecordError, match="record 1: no 'category'"):
        M.score([{"prediction": "a", "answers": ["a"], "category": "c"},
                 {"prediction": "a", "answers": ["a"]}], "exact", aggregation="macro")
    with pytest.raises(M.RecordError, match="record 0: 'answers' must be a list"):
        M.score([{"prediction": "a", "answers": "a"}], "exact")
    assert M.score([], "exact")["score"] is None


def test_every_metric_is_registered_and_bounded():
    assert set(M.METRICS.names()) >= {"exact", "choice", "anls", "relaxed", "vqa", "pathvqa_exact",
                                      "pathvqa_f1", "pathvqa_yesno", "clock", "clock_hour",
                                      "clock_minute", "number"}
    for name in M.METRICS:
        for pred, answers in [("", ["xy"]), ("A", ["A"]), ("yes", ["yes", "no"]), ("3:45 7", ["3:45"])]:
            v = M.METRICS.get(name)(pred, answers, FOUR)
            assert v is None or 0.0 <= v <= 1.0, (name, pred, v)


def test_metrics_do_not_import_torch():
    code = "import sys, lmm_ray.metrics, lmm_ray.score; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# score.py


def _write(tmp_path, lines) -> Path:
    p = tmp_path / "preds.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_score_file(tmp_path, capsys):
    p = _write(tmp_path, [
        {"id": "1", "prompt": "q", "prediction": "B", "answers": ["B"], "choices": FOUR,
         "category": "m", "score": 1},
        "",  # blank lines are skipped
        {"prediction": "(a)", "answers": [1], "choices": FOUR, "category": "n"},  # gold index 1 = B
    ])
    r = S.score_file(p, "choice")
    assert (r["score"], r["n"], r["path"]) == (50.0, 2, str(p))
    assert r["by_category"] == {"m": {"score": 100.0, "n": 1}, "n": {"score": 0.0, "n": 1}}
    assert cli.main(["score", str(p), "--metric", "choice", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 50.0
    assert cli.main(["score", str(p), "-m", "choice", "-a", "macro"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("choice (macro): 50.00 on 2 predictions") and "  m: 100.00 (n=1)" in out


@pytest.mark.parametrize("lines, metric, message", [
    ([{"prediction": "a", "answers": ["a"]}, "{not json"], "exact", r":2: not valid JSON"),
    ([{"prediction": "a", "answers": ["a"]}, "", {"prediction": "a"}], "exact",
     r":3: missing field 'answers'"),
    ([{"answers": ["a"]}], "exact", r":1: missing field 'prediction'"),
    ([{"prediction": "a", "answers": "a"}], "exact", r":1: 'answers' is not a list.*\[\"B\"\]"),
    ([{"prediction": "a", "answers": []}], "exact", r":1: 'answers' is empty"),
    ([{"prediction": None, "answers": ["a"]}], "exact", r":1: 'prediction' is NoneType"),
    ([{"prediction": "a", "answers": ["a"]}, {"prediction": "E", "answers": ["E"], "choices": FOUR}],
     "choice", r":2: gold letter 'E'"),
    ([{"prediction": "a", "answers": ["a"]}], "exct", r"unknown metric 'exct'\. Did you mean 'exact'"),
    (["[1, 2]"], "exact", r":1: a line must be a JSON object"),
    ([""], "exact", r"no predictions in the file"),
])
def test_score_file_errors(tmp_path, lines, metric, message):
    p = _write(tmp_path, lines)
    with pytest.raises(S.ScoreError, match=message):
        S.score_file(p, metric)


def test_score_errors_are_value_errors_and_exit_2(tmp_path, capsys):
    assert issubclass(S.ScoreError, ValueError)
    with pytest.raises(S.ScoreError, match="not found"):
        S.score_file(tmp_path / "missing.jsonl", "exact")
    assert cli.main(["score", str(tmp_path / "missing.jsonl"), "-m", "exact"]) == 2
    assert "error: predictions file" in capsys.readouterr().err
    p = _write(tmp_path, [{"prediction": "a", "answers": ["a"]}])
    assert cli.main(["score", str(p), "-m", "vqa_acc"]) == 2
    assert "Valid choices:" in capsys.readouterr().err
