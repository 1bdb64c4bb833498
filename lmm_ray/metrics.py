"""Official benchmark metrics, re-implemented so lmm_ray's numbers can be compared with lmms-eval's.

Every metric is a named function in `METRICS`:

    metric(prediction: str, answers: list[str], choices: list[str] | None) -> float | None

It returns the sample's score in [0, 1]; the best over `answers` where the official code scores
one reference. `None` means "this sample does not count for this metric" (only `pathvqa_yesno`
returns it, for questions whose gold answer is not yes/no). An empty `answers` list scores 0.

`score(records, metric, aggregation)` applies a metric to records and aggregates them in
percentage points (`mean`, or `macro` = mean over categories as MMStar reports it).

Sources (read at lmms-eval 75571cf and the study fork jessemelpolio/LMM_CL, which match for
anls, textvqa and chartqa); each function cites the file it re-implements. Where we follow an
odd detail of the official code on purpose (so the numbers agree) or leave it (because our
inputs differ), the comment says so. No torch here: scoring a JSONL file must stay cheap.

Where we differ from the official code, on purpose:
- choice: one extractor for every multiple-choice set (lmms-eval's differs per task); it adds
  whole-option-text, lone lower-case letters and "(b)", and raises for a gold letter no option has;
- relaxed: surrounding whitespace is stripped first;
- number: number words match as whole words (the fork's substring replace reads "fourteen" as 4);
- pathvqa_yesno: yes/no questions are picked by their gold answer, not the question's first word;
- several answers: the best one counts, where the official code scores a single reference.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Callable, Iterable, Mapping, Sequence

from lmm_ray import answers as typed_rules
from lmm_ray.registry import Registry

Metric = Callable[[str, Sequence[str], "Sequence[str] | None"], "float | None"]
Aggregation = Callable[[Sequence[float], Sequence["str | None"]], float]

METRICS: Registry[Metric] = Registry("metric")
AGGREGATIONS: Registry[Aggregation] = Registry("aggregation")

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class RecordError(ValueError):
    """A record that cannot be scored; `index` is its position in the records given to `score`."""

    def __init__(self, index: int, message: str):
        super().__init__(f"record {index}: {message}")
        self.index = index
        self.detail = message


def _best(values: Iterable[float]) -> float:
    return max(values, default=0.0)


# ---------------------------------------------------------------------------------------------
# exact


def normalize_exact(text: str) -> str:
    """lower-case, strip surrounding whitespace, drop trailing periods, strip again.
    Nothing else: articles, inner punctuation and inner whitespace are kept (that is the
    study fork's RealWorldQA rule `pred.lower().strip().rstrip(".")`, fork
    tasks/realworldqa/utils.py, applied to both sides)."""
    return text.lower().strip().rstrip(".").strip()


@METRICS.register("exact")
def exact(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """1 if the normalised prediction equals any normalised answer (see `normalize_exact`)."""
    p = normalize_exact(prediction)
    return _best(float(p == normalize_exact(a)) for a in answers)


# ---------------------------------------------------------------------------------------------
# choice: a multiple-choice letter


# lmms-eval's default letters when the options are not known (mcq_extract._DEFAULT_CHOICES).
DEFAULT_LETTERS = LETTERS[:8]
# Phrases after which lmms-eval looks for the letter (mcq_extract._ANSWER_PHRASES, same order).
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is",
    "the best answer is", "best answer is", "the correct option is", "correct option is",
    "the best option is", "best option is", "the choice is", "choice is",
    "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
# Higher wins; within one format the later position wins (mcq_extract._FORMAT_PRIORITY).
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
             "right_paren": 3, "space": 2}
_LONE_LETTER = re.compile(r"\(?([A-Za-z])[.):]?")


def _option_key(text: str) -> str:
    """Option text as MultiChoiceRegexFilter compares it with ignore_case and ignore_punctuation:
    lower-case, every Unicode punctuation character (category P*) removed; we also collapse
    whitespace so "a  dog" and "a dog" are one option."""
    no_punct = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(no_punct.split())


def _letter_candidates(text: str, letters: str) -> list[tuple[int, int, str]]:
    """(priority, position, letter) for every letter format lmms-eval's extract_mcq_answer knows
    (lmms_eval/tasks/_task_utils/mcq_extract.py, used by MMStar and RealWorldQA). Letters are
    upper-case only, so the article "a" is never read as option A, except in "(a)": a bracketed
    lower-case letter is not an article, and the study fork's MMStar rule accepts it."""
    text = " " + text.strip().strip(",.!?;:'\"") + " "
    lower = text.lower()
    found = []
    for ch in letters:
        for fmt, pattern in (("period", ch + "."), ("colon", ch + ":"),
                             ("right_paren", ch + ")"), ("space", ch + " ")):
            if pattern in text:
                found.append((_PRIORITY[fmt], text.rfind(pattern), ch))
        paren = f"({ch.lower()})"
        if paren in lower:
            found.append((_PRIORITY["parentheses"], lower.rfind(paren), ch))
    for phrase in _ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for ch in letters:  # any of the letters after the phrase, as lmms-eval does
                pos = text.find(ch, at + len(phrase))
                if pos != -1:
                    found.append((_PRIORITY["phrase"], pos, ch))
    s = text.strip()
    for ch in letters:  # a standalone letter opening or closing the answer
        if s.startswith(ch) and (len(s) == 1 or not s[1].isalpha()):
            found.append((_PRIORITY["start"], 0, ch))
        if s.endswith(ch) and (len(s) == 1 or not s[-2].isalpha()):
            found.append((_PRIORITY["end"], len(text) - 1, ch))
    return found


def valid_letters(choices: Sequence[str] | None) -> str:
    """The letters an answer may name: one per option, or A-H when the options are unknown."""
    return LETTERS[:len(choices)] if choices else DEFAULT_LETTERS


def extract_letter(prediction: str, choices: Sequence[str] | None = None) -> str:
    """The option letter a free-form answer names, or "" when it names none.

    In this order (the first that finds something wins):
    1. the whole answer is one option's text ("dog", "A dog" for option "a dog") -> its letter;
       first, so an option that begins with an article is not read as letter A;
    2. the whole answer is one letter, any case, optionally "(x)", "x.", "x)", "x:" -> it;
    3. lmms-eval's extract_mcq_answer formats, upper-case letters only: a letter opening the
       answer ("B", "B. dog", "B: dog"), closing it ("Answer: B", "I think B"), after an answer
       phrase ("the answer is B"), "(B)" or "(b)", "B.", "B:", "B)", "B " -- highest priority first, then
       the latest position. So "I think B" is B with four options, but I with 26 (I opens it);
    4. an option's text inside the answer (MultiChoiceRegexFilter step 1): the leftmost, the
       longest at one position ("a hot dog" -> "hot dog" over "dog");
    5. lmms-eval's last resort: the last upper-case valid letter anywhere ("Dog" -> D).
    """
    letters = valid_letters(choices)
    if not prediction.strip():
        return ""
    keys = [_option_key(c) for c in choices or ()]
    pkey = _option_key(prediction)
    if pkey and pkey in keys:
        return letters[keys.index(pkey)]
    m = _LONE_LETTER.fullmatch(prediction.strip())
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    found = _letter_candidates(prediction, letters)
    if found:
        return max(found)[2]
    hits = [(pkey.find(k), -len(k), i) for i, k in enumerate(keys) if k and k in pkey]
    if hits:
        return letters[min(hits)[2]]
    last = [(prediction.rfind(ch), ch) for ch in letters if ch in prediction]
    return max(last)[1] if last else ""


def gold_letter(answer: str, choices: Sequence[str] | None) -> str | None:
    """A gold answer as a letter: "B", "b", "(B)", "B." -> B; with choices, a digit string is a
    0-based option index (AI2D, ScienceQA: "1" -> B, even when the options are digits) and an
    option's text is its letter (also a one-letter text beyond the options: "x" of ["x", "y"]).
    None when it is none of these (an open-ended answer)."""
    a = answer.strip()
    m = _LONE_LETTER.fullmatch(a)
    if m and m.group(1).upper() in valid_letters(choices):
        return m.group(1).upper()
    if choices and a.isascii() and a.isdigit() and int(a) < len(choices):
        return LETTERS[int(a)]
    keys = [_option_key(c) for c in choices or ()]
    if a and _option_key(a) in keys:
        return LETTERS[keys.index(_option_key(a))]
    return m.group(1).upper() if m else None  # a letter no option has: `choice` raises


@METRICS.register("choice")
def choice(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """1 if the letter `extract_letter` reads equals the gold letter. A gold that is no letter,
    index or option (RealWorldQA mixes in open questions) is scored with `exact` instead, as the
    study fork scores all of RealWorldQA. A gold letter outside the valid letters raises
    ValueError: it could never be matched, so every such sample would silently score 0."""
    letters = valid_letters(choices)
    read = extract_letter(prediction, choices)
    best = 0.0
    for a in answers:
        g = gold_letter(a, choices)
        if g is None:
            best = max(best, exact(prediction, [a]))
        elif g not in letters:
            raise ValueError(
                f"gold letter {g!r} is not one of the options {letters[0]}-{letters[-1]}; "
                + ("give the record all its choices" if choices else
                   "without choices only A-H are valid, so give the record its choices"))
        elif read == g:
            best = 1.0
    return best


# ---------------------------------------------------------------------------------------------
# anls: DocVQA, InfoVQA


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1), one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@METRICS.register("anls")
def anls(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None,
         threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one sample (lmms_eval/api/metrics.py `anls`).

    Both strings are lower-cased, stripped and have whitespace runs collapsed; per answer the
    similarity is 1 - distance / max length, the best answer counts, and a best similarity
    below `threshold` (0.5; exactly 0.5 is kept) scores 0. Like lmms-eval we take the max length
    of the *raw* strings (`len(s.upper())`), not the normalised ones: a prediction padded with
    spaces is divided by a longer length and so scores a little higher; we keep that so the
    numbers agree. Two empty strings have distance 0 over length 0: similarity 1.
    """
    p = " ".join(prediction.strip().lower().split())
    best = 0.0
    for a in answers:
        g = " ".join(a.strip().lower().split())
        length = max(len(a.upper()), len(prediction.upper()))
        best = max(best, 1.0 - (levenshtein(g, p) / length if length else 0.0))
    return best if best >= threshold else 0.0


# ---------------------------------------------------------------------------------------------
# relaxed: ChartQA


def _chart_float(text: str) -> float | None:
    """A number as ChartQA's `_to_float` reads it: Python float(), "x%" -> x / 100."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


@METRICS.register("relaxed")
def relaxed(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None,
            tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (lmms_eval/tasks/chartqa/utils.py `relaxed_correctness`).

    When both parse as numbers and the gold is non-zero: right iff |p - g| / |g| <= 5%.
    "45%" is 0.45, so "45" is wrong for gold "45%" but "0.45" and "44%" are right. Otherwise
    (text, or a gold of 0) a case-insensitive string equality: "The answer is 14." is wrong.
    We strip surrounding whitespace first (lmms-eval's model wrappers strip generated text
    before this function sees it; a JSONL prediction may still carry a newline).
    """
    p = prediction.strip()
    pf = _chart_float(p)
    best = 0.0
    for a in answers:
        a = a.strip()
        gf = _chart_float(a)
        if pf is not None and gf:  # gf == 0 falls through to string equality, as lmms-eval
            ok = abs(pf - gf) / abs(gf) <= tolerance
        else:
            ok = p.lower() == a.lower()
        best = max(best, float(ok))
    return best


# ---------------------------------------------------------------------------------------------
# vqa: TextVQA (VQA accuracy with EvalAI answer normalisation)

# lmms_eval/tasks/_task_utils/vqa_eval_metric.py (EvalAIAnswerProcessor, from facebookresearch/mmf).
_CONTRACTIONS = {  # only the lower-case keys: answers are lower-cased before the lookup
    k.replace("'", ""): k for k in (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd "
        "he's how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't "
        "not've o'clock oughtn't shan't should've shouldn't someone'll someone's something'll that's "
        "there'd there're there's they'd they'll they're they've wasn't we've weren't what'll "
        "what're what's what've when's where'd where's where've who'd who'll who's who've "
        "why'll why're why's won't would've wouldn't y'all you'd you'll you're you've "
        "somebody'll somebody's someone'd something'd").split()
}
_CONTRACTIONS.update({  # the table's irregular entries (two apostrophes, or a partial form)
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "hed've": "he'd've", "he'dve": "he'd've", "itd've": "it'd've",
    "it'dve": "it'd've", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "somethingd've": "something'd've", "something'dve": "something'd've", "thered've": "there'd've",
    "there'dve": "there'd've", "theyd've": "they'd've", "they'dve": "they'd've", "twas": "'twas",
    "wed've": "we'd've", "we'dve": "we'd've", "whod've": "who'd've", "who'dve": "who'd've",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd've": "you'd've", "you'dve": "you'd've", "let's": "let's",
})
_NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
               "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a typo for a look-behind and
# never fires, so it removes every period not followed by a digit ("3.5" keeps its period).
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_vqa(text: str) -> str:
    """EvalAI's answer normalisation, step by step as EvalAIAnswerProcessor.__call__:
    1. lower-case; delete "," and "?"; "'s" -> " 's"; newlines/tabs -> spaces; strip;
    2. each mark of _VQA_PUNCT is deleted where it touches a space in the text ("a - b"), else
       replaced by a space ("coca-cola" -> "coca cola"). (The official test also deletes when a
       comma sits between digits, which cannot happen after step 1 deleted the commas.)
    3. periods not followed by a digit are deleted -- at most 32, because the official code
       passes re.UNICODE (= 32) where `sub` takes its count;
    4. per word: number words none/zero..ten -> digits, articles a/an/the dropped, contractions
       restored ("dont" -> "don't"); words re-joined by single spaces.
    """
    t = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = t.replace("\n", " ").replace("\t", " ").strip()
    out = t
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if (p + " " in t or " " + p in t) else " ")
    out = _PERIOD.sub("", out, count=32)
    words = [_NUMBER_MAP.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


@METRICS.register("vqa")
def vqa(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """VQA accuracy (lmms_eval/tasks/textvqa/utils.py `textvqa_process_results`).

    Prediction and every annotator answer go through `normalize_vqa`. For each annotator i,
    acc_i = min(1, #(other annotators whose answer equals the prediction) / 3); the score is
    the mean of acc_i. With 10 answers: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0.
    A single answer always scores 0 (no other annotator is left), exactly as the official code.
    """
    if not answers:
        return 0.0
    p = normalize_vqa(prediction)
    hits = [normalize_vqa(a) == p for a in answers]
    total = sum(hits)
    # leaving annotator i out removes its own hit from the count
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(hits)


# ---------------------------------------------------------------------------------------------
# PathVQA (study fork lmms-eval/lmms_eval/tasks/pathvqa/utils.py, from the official PathVQA script)


def _path_words(text: str) -> Counter:
    """Word counts after the official `split_sentence(s, 1)`: every character that is not an
    ASCII letter or a space is deleted (so digits vanish and "non-small" becomes "nonsmall"),
    then lower-case and split on spaces."""
    return Counter(re.sub(r"[^a-zA-Z ]", "", text).lower().split())


@METRICS.register("pathvqa_exact")
def pathvqa_exact(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """The fork's `calculate_exactmatch`: (#distinct reference words found in the prediction) /
    (#words in the prediction). "coagulative necrosis" for "necrosis" -> 1/2; an empty
    prediction -> 0. The fork strips the prediction first; stripping changes no word count."""
    cand = _path_words(prediction)
    total = sum(cand.values())
    if not total:
        return 0.0
    return _best(sum(1 for w in _path_words(a) if w in cand) / total for a in answers)


@METRICS.register("pathvqa_f1")
def pathvqa_f1(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """The fork's `calculate_f1score` on word counts: tp = prediction count of words also in the
    reference (not clipped: "no no" vs "no" has tp 2), fp = prediction count of the others,
    fn = reference count of words missing from the prediction; F1 = 2PR/(P+R), 0 when tp = 0."""
    cand = _path_words(prediction)

    def f1(ref: Counter) -> float:
        tp = sum(n for w, n in cand.items() if w in ref)
        fp = sum(n for w, n in cand.items() if w not in ref)
        fn = sum(n for w, n in ref.items() if w not in cand)
        if not cand or not ref or tp == 0:
            return 0.0
        prec, rec = tp / (tp + fp), tp / (tp + fn)
        return 2 * prec * rec / (prec + rec)

    return _best(f1(_path_words(a)) for a in answers)


@METRICS.register("pathvqa_yesno")
def pathvqa_yesno(prediction: str, answers: Sequence[str],
                  choices: Sequence[str] | None = None) -> float | None:
    """Binary accuracy on yes/no questions: the fork's strict `pred.lower().strip() == gold`.
    Counted: samples with a gold answer that is "yes" or "no" after lower() and strip(); every
    other sample returns None and is left out of the mean. Scored: 1 iff the prediction,
    lower-cased and stripped, is exactly that gold ("Yes" -> right; "Yes." and
    "No, there is no necrosis" -> wrong). The fork picks the questions by their first word
    (is/are/does/...), which needs the question; we pick them by the gold answer, which the
    metric has. On PathVQA the two agree except for the rare is/are question with an
    open answer ("is this lung or liver?"), which the fork counts and we do not."""
    gold = {a.lower().strip() for a in answers} & {"yes", "no"}
    if not gold:
        return None
    return float(prediction.lower().strip() in gold)


# ---------------------------------------------------------------------------------------------
# clock: TimeClock (study fork lmms-eval/lmms_eval/tasks/timeclock/utils.py)

_HH_MM = re.compile(r"([0-9]{1,2}):([0-9]{1,2})")


def parse_clock(text: str) -> tuple[int, int] | None:
    """(hour, minute) as the fork's `parse_time`: lower-case, delete periods, then the first
    "H:MM" (1-2 digits each side), else the first two integers. The hour is kept as written,
    not reduced mod 12. (The fork's middle pattern, "time is ... H:MM", can never match when
    the first did not; we leave it out.) "3.45" reads as one number 345 and fails, as there."""
    t = text.lower().replace(".", "")
    m = _HH_MM.search(t)
    nums = m.groups() if m else re.findall(r"[0-9]+", t)[:2]
    return (int(nums[0]), int(nums[1])) if len(nums) == 2 else None


def _clock_parts(prediction: str, answers: Sequence[str]) -> list[tuple[bool, bool]]:
    """(hour right, minute right) against each answer; both wrong when either side fails to parse.
    Hour: exact integer equality, as the fork, so "15:45" is wrong for "3:45" and "12:00" is
    wrong for "0:00" (lmm_ray/evaluate.py compares hours mod 12 and accepts both). Minute:
    |difference| <= 1, or exactly 59 (":59" vs ":00" wraps; the hour is still compared as is)."""
    p = parse_clock(prediction)
    out = []
    for a in answers:
        g = parse_clock(a)
        if p is None or g is None:
            out.append((False, False))
            continue
        dm = abs(p[1] - g[1])
        out.append((p[0] == g[0], dm <= 1 or dm == 59))
    return out


@METRICS.register("clock")
def clock(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """The fork's `both_accuracy`: hour right and minute right (see `_clock_parts`)."""
    return _best(float(h and m) for h, m in _clock_parts(prediction, answers))


@METRICS.register("clock_hour")
def clock_hour(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """The fork's `hour_accuracy`."""
    return _best(float(h) for h, _ in _clock_parts(prediction, answers))


@METRICS.register("clock_minute")
def clock_minute(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """The fork's `minute_accuracy`."""
    return _best(float(m) for _, m in _clock_parts(prediction, answers))


# ---------------------------------------------------------------------------------------------
# number: PixMo-Count (study fork lmms-eval/lmms_eval/tasks/pixmocount/utils.py)

_COUNT_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_FIRST_COUNT = re.compile(r"[0-9]+|\b(?:" + "|".join(_COUNT_WORDS) + r")\b")


def parse_count(text: str) -> int | None:
    """The first integer in the text: digits, or a whole number word zero..twenty. Periods are
    deleted first as in the fork ("3." -> 3, but "2.5" -> 25). Unlike the fork we match whole
    words: its substring replacement reads "fourteen" as 4 ("four" is replaced first) and
    "someone"/"none" as 1."""
    m = _FIRST_COUNT.search(text.lower().replace(".", ""))
    if m is None:
        return None
    s = m.group(0)
    return int(s) if s.isdigit() else _COUNT_WORDS.index(s)


@METRICS.register("number")
def number(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """1 if `parse_count` finds the same integer in prediction and answer; 0 if either has none."""
    p = parse_count(prediction)
    return _best(float(p is not None and p == parse_count(a)) for a in answers)


# ---------------------------------------------------------------------------------------------
# Aggregation and `score`


# ---------------------------------------------------------------------------------------------
# typed_<answer type>: the generated skills' rules (answers.py), so their predictions re-score too


def _typed(answer_type: str) -> Metric:
    def metric(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
        return float(any(typed_rules.is_correct(prediction, a, answer_type, tuple(choices or ())) for a in answers))

    return metric


for _t in typed_rules.ANSWER_TYPES:
    METRICS.register(f"typed_{_t}", _typed(_t))


@AGGREGATIONS.register("mean")
def mean(values: Sequence[float], categories: Sequence[str | None]) -> float:
    """Mean over samples (micro average)."""
    return sum(values) / len(values)


@AGGREGATIONS.register("macro")
def macro(values: Sequence[float], categories: Sequence[str | None]) -> float:
    """Mean over categories of the per-category mean, so a small category weighs as much as a
    large one (MMStar's `average`: the l2-category means averaged; lmms-eval tasks/mmstar/utils.py
    `mmstar_aggregate_results`). Every sample needs a category."""
    groups = _group(values, categories)
    return sum(sum(v) / len(v) for v in groups.values()) / len(groups)


def _group(values: Sequence[float], categories: Sequence[str | None]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for v, c in zip(values, categories):
        if c is not None:
            groups.setdefault(c, []).append(v)
    return groups


def score(records: Iterable[Mapping], metric: str, aggregation: str = "mean") -> dict:
    """Score records with a named metric.

    records: mappings with `prediction` (str) and `answers` (list of str), optionally `choices`
    (list of str) and `category` (str). Returns {"metric", "aggregation", "score" (percentage
    points, None when no sample counts), "n" (samples counted), "skipped" (samples the metric
    left out, see pathvqa_yesno), "by_category" ({category: {"score", "n"}}; empty when no
    record has a category)}. An unknown metric or aggregation raises registry.UnknownName
    naming the valid ones; a record that cannot be scored raises RecordError (a ValueError).
    """
    fn = METRICS.get(metric)
    agg = AGGREGATIONS.get(aggregation)
    values: list[float] = []
    cats: list[str | None] = []
    skipped = 0
    for i, r in enumerate(records):
        for key in ("prediction", "answers"):
            if key not in r:
                raise RecordError(i, f"no {key!r} field")
        pred, answers, choices = r["prediction"], r["answers"], r.get("choices")
        if not isinstance(pred, str):
            raise RecordError(i, f"'prediction' must be a string, got {type(pred).__name__}")
        if isinstance(answers, str) or not isinstance(answers, Sequence) or \
                not all(isinstance(a, str) for a in answers):
            raise RecordError(i, "'answers' must be a list of strings")
        if choices is not None and (isinstance(choices, str) or not isinstance(choices, Sequence)
                                    or not all(isinstance(c, str) for c in choices)):
            raise RecordError(i, "'choices' must be a list of strings or absent")
        try:
            v = fn(pred, list(answers), list(choices) if choices is not None else None)
        except ValueError as e:
            raise RecordError(i, str(e)) from e
        if v is None:
            skipped += 1
            continue
        category = r.get("category")
        if aggregation == "macro" and category is None:
            raise RecordError(i, "no 'category': the macro aggregation averages per category")
        values.append(float(v))
        cats.append(None if category is None else str(category))
    by_category = {c: {"score": 100.0 * sum(v) / len(v), "n": len(v)}
                   for c, v in sorted(_group(values, cats).items())}
    return {
        "metric": metric,
        "aggregation": aggregation,
        "score": 100.0 * agg(values, cats) if values else None,
        "n": len(values),
        "skipped": skipped,
        "by_category": by_category,
    }
