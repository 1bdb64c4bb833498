"""Load real datasets into Samples: LLaVA conversation JSON, the study's dataset YAML, and
Hugging Face datasets (hub id or local copy).

Every loader checks the structure of all records first and only then opens images, and only
those of the records kept after sampling: a bad record deep in a 30k-record file is reported
at once, and `first:10` opens 10 images. Bad input raises `DataError`, whose message names the
file, the record (index and id) and the field, and says what was expected.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
    """Option texts of a CUB-style question ("...\\nA. opt\\nB. opt ..."); () if none.
    The letters must run A, B, C, ... so that a stray "I. " line is not read as options."""
    found = _OPTION_RE.findall(question)
    opts = []
    for letter, text in found:
        if ord(letter) - ord("A") != len(opts):
            break
        opts.append(text)
    return tuple(opts) if len(opts) >= 2 else ()


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


@dataclass
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
                            f"but the question has no 'A. ...' / 'B. ...' lines")
        letter = answer.strip().rstrip(".").upper()
        if not re.fullmatch(r"[A-Z]", letter) or ord(letter) - ord("A") >= len(choices):
            raise DataError(f"{where}, field {field_name!r}: answer {answer!r} should be one option letter "
                            f"A..{chr(ord('A') + len(choices) - 1)}")
        return letter, kind, choices
    return answer.strip(), kind, ()


def _llava_record(rec: Any, index: int, path: Path, answer_type: str | None, skill: str) -> _Pending:
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
                    str(rid) if rid not in (None, "") else f"{path.stem}-{index}",
                    meta={"source": str(path), "index": index, "image": image})


def _read_json_records(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: record {len(records)} (line {lineno}, column {e.colno}) "
                                    f"is not valid JSON: {e.msg}") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: the top level should be a JSON list of records, got {type(records).__name__}")
    return records


def _plan_llava(json_path, image_folder, sampling, seed, answer_type, skill) -> list[_Pending]:
    path = Path(json_path)
    try:
        parse_sampling(sampling)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    _check_answer_type(answer_type, path)
    # All records are checked (cheap) before sampling, so a broken file fails whatever is sampled.
    pending = [_llava_record(r, i, path, answer_type, skill or "") for i, r in enumerate(_read_json_records(path))]
    folder = Path(image_folder) if image_folder is not None else path.parent
    for p in pending:
        p.image = folder / p.image  # an absolute image path stays as it is
        p.image_folder = str(folder)
    return apply_sampling(pending, sampling, seed)


# ---------------------------------------------------------------- opening images


def _open_image(p: _Pending) -> Image.Image:
    img = p.image
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
        what = p.image if isinstance(p.image, (str, Path)) else "the image"
        raise DataError(f"{p.where}, field 'image': cannot read {what} as an image: {e}") from None


def _materialise(pending: list[_Pending]) -> list[Sample]:
    return [Sample(_open_image(p), p.question, p.answer, p.answer_type, p.choices, p.skill, p.id, p.meta)
            for p in pending]


# ---------------------------------------------------------------- public loaders


def load_llava_json(json_path, image_folder, *, sampling: str = "all", seed: int = 0,
                    answer_type: str | None = None, skill: str | None = None) -> list[Sample]:
    """Samples from a LLaVA conversation file (.json list or .jsonl). Relative image paths
    resolve against `image_folder` (None: the JSON file's folder)."""
    return _materialise(_plan_llava(json_path, image_folder, sampling, seed, answer_type, skill))


def load_dataset_yaml(yaml_path, image_folder, seed: int = 0) -> list[Sample]:
    """Samples of every `datasets:` entry of a study-format YAML, concatenated in order.
    Entries may also set `answer_type` and `skill`."""
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
    pending = [p for jp, s, at, sk in specs for p in _plan_llava(jp, image_folder, s, seed, at, sk)]
    return _materialise(pending)


DEFAULT_HF_COLUMNS = {"image": "image", "question": "question", "answer": "answer"}
_HF_FIELDS = ("image", "question", "answer", "choices", "id")
_HF_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def _open_hf(path_or_id: str, split: str):
    import datasets  # optional dependency: only this loader needs it

    p = Path(path_or_id).expanduser()
    try:
        if p.is_dir() and any((p / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(p))  # a folder written by save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path_or_id}: no split {split!r}; its splits are {sorted(ds)}")
                ds = ds[split]
            return ds
        if p.is_file():
            builder = _HF_FILE_BUILDERS.get(p.suffix)
            if builder is None:
                raise DataError(f"{path_or_id}: cannot load a {p.suffix!r} file; expected one of {sorted(_HF_FILE_BUILDERS)}")
            return datasets.load_dataset(builder, data_files={split: str(p)}, split=split)
        if p.is_dir():
            return datasets.load_dataset(str(p), split=split)
        if p.is_absolute() or str(path_or_id).startswith((".", "~")):
            raise DataError(f"{path_or_id}: dataset path not found")
        return datasets.load_dataset(path_or_id, split=split)  # a hub id
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; name the source either way
        raise DataError(f"{path_or_id} (split {split!r}): could not load the dataset: {type(e).__name__}: {e}") from e


def _most_common(values: list) -> Any:
    # Counter keeps first-seen order among ties, so a tie goes to the earliest answer.
    values = [v for v in values if v is not None and str(v).strip()]
    return Counter(str(v).strip() for v in values).most_common(1)[0][0] if values else None


def load_hf_dataset(path_or_id, *, split: str = "train", columns: dict | None = None, n: int | str | None = None,
                    seed: int = 0, answer_type: str | None = None, skill: str | None = None) -> list[Sample]:
    """Samples from a Hugging Face dataset: a hub id, a `save_to_disk` folder, or local data
    files (parquet/json/csv). `columns` maps our fields (image, question, answer, optional
    choices and id) to the dataset's columns. `n`: the first n rows, or a sampling strategy
    string such as "random:500" (which uses `seed`). List answers take the most common one."""
    source = f"{path_or_id} (split {split!r})"
    _check_answer_type(answer_type, source)
    unknown = set(columns or {}) - set(_HF_FIELDS)
    if unknown:
        raise DataError(f"{source}: columns mapping has unknown field(s) {sorted(unknown)}; fields are {_HF_FIELDS}")
    cols = {**DEFAULT_HF_COLUMNS, **(columns or {})}
    sampling = "all" if n is None else (f"first:{n}" if isinstance(n, int) else str(n))
    try:
        parse_sampling(sampling)
    except DataError as e:
        raise DataError(f"{source}: field 'n': {e}") from None

    ds = _open_hf(str(path_or_id), split)
    for fld, col in cols.items():
        if col not in ds.column_names:
            raise DataError(f"{source}: column {col!r} (for field {fld!r}) is not in the dataset; "
                            f"its columns are {ds.column_names}")
    rows = apply_sampling(range(len(ds)), sampling, seed)
    # Text columns first (no image decoding), so bad rows fail before any image is opened.
    text = ds.select(rows).select_columns([c for f, c in cols.items() if f != "image"]).to_dict()
    pending = []
    for j, i in enumerate(rows):
        rid = text[cols["id"]][j] if "id" in cols else None
        where = _where(source, i, rid)
        q = text[cols["question"]][j]
        if not isinstance(q, str) or not clean_question(q):
            raise DataError(f"{where}, field 'question' (column {cols['question']!r}): missing or empty")
        q = clean_question(q)
        a = text[cols["answer"]][j]
        a = _most_common(a) if isinstance(a, (list, tuple)) else a
        choices = tuple(str(c) for c in text[cols["choices"]][j]) if "choices" in cols else ()
        if choices and isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(choices):
            a = chr(ord("A") + a)  # an index into the choices
        elif choices and str(a).strip() in choices:
            a = chr(ord("A") + choices.index(str(a).strip()))  # the option text itself
        if a is None or not str(a).strip():
            raise DataError(f"{where}, field 'answer' (column {cols['answer']!r}): missing or empty")
        if choices and not parse_choices(q):
            # A choice question shows its options, as in the study's CUB format.
            q += "\n" + "\n".join(f"{chr(ord('A') + k)}. {c}" for k, c in enumerate(choices))
        a, kind, choices = _typed_answer(where, "answer", str(a), q, answer_type, choices)
        pending.append(_Pending(where, None, q, a, kind, choices, skill or "",
                                str(rid) if rid not in (None, "") else f"{Path(str(path_or_id)).name}-{split}-{i}",
                                meta={"source": str(path_or_id), "split": split, "index": i}))
    base = Path(str(path_or_id)) if Path(str(path_or_id)).is_dir() else None
    images = ds.select(rows)[cols["image"]] if rows else []
    for p, img in zip(pending, images):
        if isinstance(img, str) and base is not None and not Path(img).is_absolute():
            img = base / img  # a relative image path in a local dataset
        p.image = img
        p.image_folder = str(base) if base is not None else ""
    return _materialise(pending)


# ---------------------------------------------------------------- one entry point for sweep configs

_SOURCE_FORMS = (
    '{"llava_json": path, "image_folder": dir, "sampling": "all", "answer_type": ..., "skill": ...}, '
    '{"dataset_yaml": path, "image_folder": dir}, '
    '{"hf": id_or_path, "split": "train", "columns": {...}, "n": ..., "answer_type": ..., "skill": ...}'
)
_SOURCE_OPTIONS = {
    "llava_json": {"image_folder", "sampling", "answer_type", "skill"},
    "dataset_yaml": {"image_folder"},
    "hf": {"split", "columns", "n", "answer_type", "skill"},
}


def load_samples(source: dict, *, seed: int = 0) -> list[Sample]:
    """Samples for a sweep config's data source, one of the forms in _SOURCE_FORMS."""
    kinds = [k for k in _SOURCE_OPTIONS if isinstance(source, dict) and k in source]
    if len(kinds) != 1:
        raise DataError(f"data source {source!r} should have exactly one of the keys "
                        f"{list(_SOURCE_OPTIONS)}; the forms are: {_SOURCE_FORMS}")
    kind, s = kinds[0], source
    extra = set(s) - _SOURCE_OPTIONS[kind] - {kind}
    if extra:
        raise DataError(f"data source {s!r}: unknown key(s) {sorted(extra)} for a {kind!r} source; "
                        f"allowed: {sorted(_SOURCE_OPTIONS[kind])}")
    if kind == "llava_json":
        return load_llava_json(s[kind], s.get("image_folder"), sampling=s.get("sampling", "all"), seed=seed,
                               answer_type=s.get("answer_type"), skill=s.get("skill"))
    if kind == "dataset_yaml":
        return load_dataset_yaml(s[kind], s.get("image_folder"), seed=seed)
    return load_hf_dataset(s[kind], split=s.get("split", "train"), columns=s.get("columns"), n=s.get("n"),
                           seed=seed, answer_type=s.get("answer_type"), skill=s.get("skill"))


__all__ = [
    "DataError", "SAMPLING_FORMS", "parse_sampling", "apply_sampling", "clean_question", "parse_choices",
    "infer_answer_type", "load_llava_json", "load_dataset_yaml", "load_hf_dataset", "load_samples",
]
