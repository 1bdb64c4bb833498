"""Load real datasets into Samples: LLaVA conversation JSON, the study's dataset YAML,
Hugging Face datasets (hub id or local copy; see hub.py) and named benchmark presets
(benchmarks.yaml; see benchmarks.py).

Two ways in: `plan_samples(source)` returns a `SamplePlan`, the source's samples as references
(text checked, image paths or dataset rows, nothing decoded), which `lmm_ray.stream` opens one
batch at a time; `load_samples(source)` opens every image at once (small sets, tests).

Every loader checks the structure of all records first and only then opens images, and only
those of the records kept after sampling: a bad record deep in a 30k-record file is reported
at once, and `first:10` opens 10 images. Bad input raises `DataError`, whose message names the
file, the record (index and id) and the field, and says what was expected.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml
from PIL import Image, UnidentifiedImageError

from lmm_ray.errors import DataError
from lmm_ray.number_words import COUNT_WORDS
from lmm_ray.skills.schema import ANSWER_TYPES, Sample


# ---------------------------------------------------------------- sampling strategies

SAMPLING_FORMS = (
    "all, first:N, end:N, random:N, first:P%, end:P%, random:P% "
    "(N a positive integer, P a percentage in (0, 100])"
)
_SAMPLING_RE = re.compile(r"(first|end|random):(\d+(?:\.\d+)?)(%?)")


def parse_sampling(s: str) -> tuple[str, float | int | None, bool]:
    """`"all"` -> ("all", None, False); `"first:10"` -> ("first", 10, False);
    `"random:2.5%"` -> ("random", 2.5, True)."""
    text = str(s).strip()
    if text == "all":
        return ("all", None, False)
    m = _SAMPLING_RE.fullmatch(text)
    if m:
        kind, num, pct = m.group(1), m.group(2), m.group(3) == "%"
        if pct and 0 < float(num) <= 100:
            return (kind, float(num), True)
        if not pct and num.isdigit() and int(num) > 0:
            return (kind, int(num), False)
    raise DataError(f"sampling strategy {s!r} is not valid; expected one of: {SAMPLING_FORMS}")


def apply_sampling(records: Sequence, s: str, seed: int = 0) -> list:
    """The records a strategy keeps, in file order. Percentages round up (as the study's
    LLaVA loader does), so a non-empty file never samples to nothing; N past the end keeps all."""
    kind, amount, is_percent = parse_sampling(s)
    records = list(records)
    if kind == "all":
        return records
    k = math.ceil(len(records) * amount / 100) if is_percent else amount
    k = min(k, len(records))
    if kind == "first":
        return records[:k]
    if kind == "end":
        return records[len(records) - k :]
    # Sorted indices keep file order, so a random subset reads like the file it came from.
    chosen = sorted(random.Random(seed).sample(range(len(records)), k))
    return [records[i] for i in chosen]


# ---------------------------------------------------------------- question / answer parsing

_OPTION_RE = re.compile(r"^([A-Z])\.\s+(.+?)\s*$", re.MULTILINE)


def clean_question(q: str) -> str:
    """Drop the `<image>` placeholder: the image reaches the model separately."""
    q = re.sub(r"^\s*<image>[ \t]*\n?|\n?[ \t]*<image>\s*$", "", q)
    return q.replace("<image>", "").strip()


def parse_choices(question: str) -> tuple[str, ...]:
    """Option texts of a question; () if none. Two layouts are read: one option per line
    ("...\\nA. opt\\nB. opt", CUB, RealWorldQA) and options inline after "Options:"
    ("Options: A: opt, B: opt", MMStar). The letters must run A, B, C, ... so that a stray
    "I. " line is not read as options."""
    found = _OPTION_RE.findall(question)
    opts = []
    for letter, text in found:
        if ord(letter) - ord("A") != len(opts):
            break
        opts.append(text)
    return tuple(opts) if len(opts) >= 2 else _parse_inline_choices(question)


_INLINE_MARK_RE = re.compile(r"(?<![^\s,;])([A-Z]):\s*")


def _parse_inline_choices(question: str) -> tuple[str, ...]:
    """ "...Options: A: x, B: y, C: z" -> ("x", "y", "z"). Only the line after the last
    "Options:" is read, and only letters in sequence split it, so a comma or a "Note: " inside
    an option stays in that option."""
    at = question.rfind("Options:")
    if at < 0:
        return ()
    line = question[at + len("Options:"):].split("\n", 1)[0]
    marks = []
    for m in _INLINE_MARK_RE.finditer(line):
        if m.group(1) == chr(ord("A") + len(marks)) and (marks or not line[:m.start()].strip()):
            marks.append(m)
    texts = [line[m.end():(marks[k + 1].start() if k + 1 < len(marks) else len(line))] for k, m in enumerate(marks)]
    texts = [t.strip().rstrip(",;").strip() for t in texts]
    return tuple(texts) if len(texts) >= 2 and all(texts) else ()


def infer_answer_type(answer: str, choices: Sequence[str] = ()) -> str:
    a = answer.strip()
    word = a.lower().rstrip(".")
    if re.fullmatch(r"\d{1,2}:[0-5]\d", a):
        return "time"
    if re.fullmatch(r"[-+]?\d+", a) or word in COUNT_WORDS:
        return "number"
    if word in ("yes", "no"):
        return "yesno"
    if choices and re.fullmatch(r"[A-Za-z]", a):
        return "choice"
    return "word"


# ---------------------------------------------------------------- records -> pending samples


@dataclass(slots=True)  # slots: a 40k-record plan holds 40k of these
class _Pending:
    """A record whose text is validated and whose image is not opened yet."""

    where: str  # "file.json: record 3 (id 'x')", the prefix of any later error
    image: Any  # a path, PIL image, bytes, or HF image dict
    question: str
    answer: str
    answer_type: str
    choices: tuple[str, ...]
    skill: str
    id: str
    image_folder: str = ""  # only for the "not found" message
    meta: dict = field(default_factory=dict)
    answers: tuple[str, ...] = ()
    context: str = ""
    category: str = ""


def _where(source: Any, index: int, rid: Any = None) -> str:
    return f"{source}: record {index}" + (f" (id {rid!r})" if rid not in (None, "") else "")


def _check_answer_type(answer_type: str | None, source: Any) -> None:
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise DataError(f"{source}: answer_type {answer_type!r} is not one of {ANSWER_TYPES} (or None to infer)")


def _typed_answer(where: str, field_name: str, answer: str, question: str, answer_type: str | None,
                  choices: tuple[str, ...] = ()) -> tuple[str, str, tuple[str, ...]]:
    """(answer, answer_type, choices), with choices parsed from the question when not given."""
    choices = choices or parse_choices(question)
    kind = answer_type or infer_answer_type(answer, choices)
    if kind == "choice":
        if not choices:
            raise DataError(f"{where}, field {field_name!r}: answer_type 'choice' needs options, "
                            f"but the question has no 'A. ...' / 'B. ...' lines nor 'Options: A: ..., B: ...'")
        letter = answer.strip().rstrip(".").upper()
        if not re.fullmatch(r"[A-Z]", letter) or ord(letter) - ord("A") >= len(choices):
            raise DataError(f"{where}, field {field_name!r}: answer {answer!r} should be one option letter "
                            f"A..{chr(ord('A') + len(choices) - 1)}")
        return letter, kind, choices
    return answer.strip(), kind, ()


def _llava_record(rec: Any, index: int, path: str, answer_type: str | None, skill: str) -> _Pending:
    if not isinstance(rec, dict):
        raise DataError(f"{_where(path, index)}: expected a JSON object, got {type(rec).__name__}")
    rid = rec.get("id")
    where = _where(path, index, rid)
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}, field 'conversations': expected a non-empty list of "
                        f'{{"from": "human"|"gpt", "value": ...}} turns, got '
                        + ("nothing (the field is missing)" if convs is None else f"{convs!r:.80}"))
    turns = [(t.get("from"), t.get("value")) if isinstance(t, dict) else (None, None) for t in convs]
    h = next((i for i, (who, _) in enumerate(turns) if who == "human"), None)
    if h is None:
        raise DataError(f"{where}, field 'conversations': no turn with \"from\": \"human\" (the question)")
    question = turns[h][1]
    if not isinstance(question, str) or not clean_question(question):
        raise DataError(f"{where}, field 'conversations[{h}].value': the question is missing or empty")
    g = next((i for i in range(h + 1, len(turns)) if turns[i][0] == "gpt"), None)
    if g is None:
        raise DataError(f"{where}, field 'conversations': no \"gpt\" turn after the question (the answer)")
    answer = turns[g][1]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}, field 'conversations[{g}].value': the answer is missing or empty")
    image = rec.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}, field 'image': expected one image path (relative to image_folder), "
                        f"got {image!r:.80}")
    question = clean_question(question)
    answer, kind, choices = _typed_answer(where, f"conversations[{g}].value", answer, question, answer_type)
    return _Pending(where, image, question, answer, kind, choices, skill,
                    str(rid) if rid not in (None, "") else f"{Path(path).stem}-{index}",
                    meta={"source": path, "index": index, "image": image})


_WS = re.compile(r"[ \t\n\r]*")


def _read_json_records(path: Path) -> Iterator[Any]:
    """The records of a .json list or a .jsonl file, one at a time: the caller turns each into a
    small `_Pending` before the next is parsed, so the parsed dicts of a whole 40k-record file
    (~1 KB each, memory Python keeps after they are freed) never exist at once."""
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        n = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: record {n} (line {lineno}, column {e.colno}) "
                                    f"is not valid JSON: {e.msg}") from None
                n += 1
                yield rec
        return
    decoder = json.JSONDecoder()
    try:
        pos = _WS.match(text, 0).end()
        if not text.startswith("[", pos):  # not a list: parse it whole for the message
            doc = json.loads(text)
            raise DataError(f"{path}: the top level should be a JSON list of records, got {type(doc).__name__}")
        pos = _WS.match(text, pos + 1).end()
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                rec, pos = decoder.raw_decode(text, pos)
                yield rec
                pos = _WS.match(text, pos).end()
                if text.startswith(",", pos):
                    pos = _WS.match(text, pos + 1).end()
                    continue
                if text.startswith("]", pos):
                    pos += 1
                    break
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _WS.match(text, pos).end()
        if pos != len(text):
            raise json.JSONDecodeError("Extra data", text, pos)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _plan_llava(json_path, image_folder, sampling, seed, answer_type, skill) -> list[_Pending]:
    path = Path(json_path)
    try:
        parse_sampling(sampling)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    _check_answer_type(answer_type, path)
    # All records are checked (cheap) before sampling, so a broken file fails whatever is sampled.
    # One string for the file and one for the folder, shared by every record, and image paths as
    # strings (not Path objects): a plan of 40k records then costs ~1 KB a record.
    src = str(path)
    pending = [_llava_record(r, i, src, answer_type, skill or "") for i, r in enumerate(_read_json_records(path))]
    folder = str(Path(image_folder) if image_folder is not None else path.parent)
    for p in pending:
        p.image = os.path.join(folder, p.image)  # an absolute image path stays as it is
        p.image_folder = folder
    return apply_sampling(pending, sampling, seed)


# ---------------------------------------------------------------- opening images


@dataclass(frozen=True, slots=True)
class HFImage:
    """A reference to the image cell of one row of a Hugging Face dataset, read when opened.

    `view` is the dataset reduced to the image column in arrow format (one object shared by every
    row of a plan, memory-mapped from the dataset's cache files), so opening a row reads that
    row's bytes only and nothing is decoded before it is needed."""

    view: Any
    row: int
    base: str | None = None  # the local dataset folder that relative image paths resolve against

    def get(self) -> Any:
        cell = self.view[self.row].column(0)[0].as_py()
        if isinstance(cell, list):  # a list-of-images column: the plan checked that the first is wanted
            cell = cell[0] if cell else None
        if isinstance(cell, str) and self.base is not None and not Path(cell).is_absolute():
            cell = Path(self.base) / cell
        return cell


def _open_image(p: _Pending) -> Image.Image:
    img = p.image.get() if isinstance(p.image, HFImage) else p.image
    try:
        if isinstance(img, Image.Image):
            return img.convert("RGB")
        if isinstance(img, dict):  # HF image feature left undecoded: {"bytes": ..., "path": ...}
            img = io.BytesIO(img["bytes"]) if img.get("bytes") else img.get("path")
        elif isinstance(img, (bytes, bytearray)):
            img = io.BytesIO(img)
        if img is None:
            raise DataError(f"{p.where}, field 'image': no image (empty value)")
        if not isinstance(img, io.BytesIO) and not Path(img).is_file():
            raise DataError(f"{p.where}, field 'image': image not found at {img}"
                            + (f" (resolved against image_folder {p.image_folder})" if p.image_folder else ""))
        with Image.open(img) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        what = img if isinstance(img, (str, Path)) else "the image"
        raise DataError(f"{p.where}, field 'image': cannot read {what} as an image: {e}") from None


def open_sample(p: "_Pending | Sample") -> Sample:
    """The Sample of a reference, its image opened (a Sample is returned as it is)."""
    if isinstance(p, Sample):
        return p
    return Sample(_open_image(p), p.question, p.answer, p.answer_type, p.choices, p.skill, p.id, p.meta,
                  answers=p.answers, context=p.context, category=p.category)


def _materialise(pending: list[_Pending]) -> list[Sample]:
    return [open_sample(p) for p in pending]


class SamplePlan:
    """The samples of one source as references: text checked, images not opened.

    `plan[i]` has the text fields of a Sample (question, answer, answer_type, choices, id, skill,
    answers, context, category, meta) and no decoded image; `plan.sample(i)` opens the image.
    Items are `_Pending` records (files, dataset rows) or Samples (generated skills, whose small
    images are drawn up front: a skill's random stream is sequential, so sample i cannot be drawn
    without drawing 0..i-1). A plan pickles cheaply: paths, row numbers and a memory-mapped
    dataset, so DataLoader workers and Ray tasks can receive it."""

    __slots__ = ("items", "source")

    def __init__(self, items: Sequence, source: str = ""):
        self.items, self.source = list(items), source

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def __iter__(self):
        return iter(self.items)

    def sample(self, i: int) -> Sample:
        return open_sample(self.items[i])

    def samples(self) -> list[Sample]:
        return [open_sample(p) for p in self.items]

    def subset(self, idx: Sequence[int]) -> "SamplePlan":
        return SamplePlan([self.items[i] for i in idx], self.source)

    def __repr__(self) -> str:
        return f"SamplePlan({self.source or '?'}, {len(self)} samples)"


# ---------------------------------------------------------------- public loaders


def load_llava_json(json_path, image_folder, *, sampling: str = "all", seed: int = 0,
                    answer_type: str | None = None, skill: str | None = None) -> list[Sample]:
    """Samples from a LLaVA conversation file (.json list or .jsonl). Relative image paths
    resolve against `image_folder` (None: the JSON file's folder)."""
    return _materialise(_plan_llava(json_path, image_folder, sampling, seed, answer_type, skill))


def load_dataset_yaml(yaml_path, image_folder, seed: int = 0) -> list[Sample]:
    """Samples of every `datasets:` entry of a study-format YAML, concatenated in order.
    Entries may also set `answer_type` and `skill`."""
    return _materialise(_plan_dataset_yaml(yaml_path, image_folder, seed))


def _plan_dataset_yaml(yaml_path, image_folder, seed: int = 0) -> list[_Pending]:
    path = Path(yaml_path)
    if not path.is_file():
        raise DataError(f"{path}: dataset YAML not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from None
    entries = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a top-level 'datasets' list of "
                        f"{{json_path: ..., sampling_strategy: ...}} entries")
    specs = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not e.get("json_path"):
            raise DataError(f"{path}: datasets[{i}], field 'json_path': missing; expected the path of a LLaVA JSON file")
        json_path = Path(e["json_path"])
        json_path = json_path if json_path.is_absolute() else path.parent / json_path
        sampling = str(e.get("sampling_strategy", "all"))
        try:
            parse_sampling(sampling)
        except DataError as err:
            raise DataError(f"{path}: datasets[{i}], field 'sampling_strategy': {err}") from None
        specs.append((json_path, sampling, e.get("answer_type"), e.get("skill")))
    # Every file is checked before any image is opened.
    return [p for jp, s, at, sk in specs for p in _plan_llava(jp, image_folder, s, seed, at, sk)]


def load_hf_dataset(path_or_id, **kw) -> list[Sample]:
    """Samples from a Hugging Face dataset (hub id, `save_to_disk` folder, data files or a
    folder laid out like a hub repo); see `lmm_ray.skills.hub.load_hf_dataset` for the options."""
    from lmm_ray.skills.hub import load_hf_dataset as load

    return load(path_or_id, **kw)


# ---------------------------------------------------------------- one entry point for sweep configs

# The seed of every subset a source keeps (`n: random:500`, `sampling: random:10%`): a property
# of the source, never of the trial, so every trial and every stage evaluate (and train on) the
# same rows. A source may set its own `seed:`.
SUBSET_SEED = 0

SOURCE_FORMS = (
    '{"llava_json": path, "image_folder": dir, "sampling": "all", "answer_type": ..., "skill": ..., "seed": 0}, '
    '{"dataset_yaml": path, "image_folder": dir, "seed": 0}, '
    '{"hf": id_or_path, "split": "train", "config": ..., "revision": ..., "columns": {...}, "filter": {...}, '
    '"multi_image": "first", "n": ..., "seed": 0, "answer_type": ..., "skill": ...}, '
    '{"benchmark": name, "path": local_copy, "n": ..., "seed": 0, "split": ..., "revision": ..., "skill": ...}'
)
SOURCE_OPTIONS = {
    "llava_json": {"image_folder", "sampling", "answer_type", "skill", "seed"},
    "dataset_yaml": {"image_folder", "seed"},
    "hf": {"split", "config", "revision", "columns", "filter", "multi_image", "n", "seed", "answer_type", "skill"},
    "benchmark": {"path", "split", "revision", "n", "seed", "skill"},
}
# config.py reads these two names to validate sweep files.
_SOURCE_FORMS = SOURCE_FORMS
_SOURCE_OPTIONS = SOURCE_OPTIONS


def check_source(source: Any) -> str:
    """The kind of a data source (one of SOURCE_OPTIONS), after the checks that need no file:
    one kind key, known option keys, a valid seed and benchmark name. Raises DataError."""
    kinds = [k for k in SOURCE_OPTIONS if isinstance(source, dict) and k in source]
    if len(kinds) != 1:
        raise DataError(f"data source {source!r} should have exactly one of the keys "
                        f"{list(SOURCE_OPTIONS)}; the forms are: {SOURCE_FORMS}")
    kind = kinds[0]
    extra = set(source) - SOURCE_OPTIONS[kind] - {kind}
    if extra:
        raise DataError(f"data source {source!r}: unknown key(s) {sorted(extra)} for a {kind!r} source; "
                        f"allowed: {sorted(SOURCE_OPTIONS[kind])}")
    seed = source.get("seed", SUBSET_SEED)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"data source {source!r}: seed {seed!r} should be an integer >= 0")
    if kind == "benchmark":
        from lmm_ray.skills import benchmarks

        benchmarks.get(source["benchmark"])
    return kind


def load_samples(source: dict, *, seed: int | None = None) -> list[Sample]:
    """Samples for a sweep config's data source, one of the forms in SOURCE_FORMS, every image
    opened. `seed` is accepted for old callers and not used (see `plan_samples`)."""
    return plan_samples(source).samples()


def plan_samples(source: dict) -> SamplePlan:
    """The samples of a sweep config's data source as references (see SamplePlan): every record
    checked, no image opened. Subsets are drawn with the source's own `seed` (default
    SUBSET_SEED), so they never change with the trial's training or evaluation seed."""
    kind, s = check_source(source), source
    sub_seed = s.get("seed", SUBSET_SEED)
    if kind == "llava_json":
        return SamplePlan(_plan_llava(s[kind], s.get("image_folder"), s.get("sampling", "all"), sub_seed,
                                      s.get("answer_type"), s.get("skill")), str(s[kind]))
    if kind == "dataset_yaml":
        return SamplePlan(_plan_dataset_yaml(s[kind], s.get("image_folder"), seed=sub_seed), str(s[kind]))
    meta = None
    if kind == "benchmark":
        from lmm_ray.skills import benchmarks

        resolved = benchmarks.resolve(s)
        s = {k: v for k, v in resolved.items() if k == "hf" or k in SOURCE_OPTIONS["hf"]}
        meta = {"benchmark": resolved["benchmark"]}
    from lmm_ray.skills.hub import plan_hf_dataset

    return plan_hf_dataset(s["hf"], split=s.get("split", "train"), config=s.get("config"), revision=s.get("revision"),
                           columns=s.get("columns"), filter=s.get("filter"), multi_image=s.get("multi_image"),
                           n=s.get("n"), seed=sub_seed, answer_type=s.get("answer_type"), skill=s.get("skill"),
                           meta=meta)


__all__ = [
    "DataError", "SAMPLING_FORMS", "SOURCE_FORMS", "SOURCE_OPTIONS", "SUBSET_SEED", "parse_sampling",
    "apply_sampling", "clean_question", "parse_choices", "infer_answer_type", "load_llava_json",
    "load_dataset_yaml", "load_hf_dataset", "load_samples", "check_source", "plan_samples", "SamplePlan",
    "HFImage", "open_sample",
]
