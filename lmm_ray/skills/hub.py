"""Hugging Face datasets -> Samples: a hub id, or a local copy (a folder laid out like a hub
repo, with config subfolders and a README `configs:` block; a `save_to_disk` folder, with one
subfolder per config; or data files).

What the evaluation sets need beyond image/question/answer columns:
  * `config` (the hub "subset": DocVQA vs InfographicVQA, ScienceQA-IMG) and `revision`;
  * list-of-images columns (SEED-Bench): the first image; a row with more than one image is an
    error unless `multi_image: first`;
  * choices from a list column (`columns: {choices: options}`) or from several columns
    (`columns: {choices: [choice_a, choice_b, choice_c, choice_d]}`); the answer may then be a
    letter, an index into the choices (int or digit string: AI2D's "1" is "B" even when the
    options are themselves digits) or the option text, and the answer type is `choice`;
  * options written in the question ("A. ..." lines, or MMStar's "Options: A: ..., B: ...");
  * list answers (TextVQA, DocVQA): all kept in `Sample.answers`, the most common in `answer`;
  * `columns: {context: hint}` and `columns: {category: l2_category}` kept on the Sample;
  * `filter: {data_type: image}`: only rows whose column equals the value (or one of a list).

Rows are checked (text only) before any image is opened, and only kept rows are opened:
`plan_hf_dataset` keeps each row's image as an `HFImage` reference (row number into the
memory-mapped dataset), opened when a batch needs it.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lmm_ray.skills.loaders import (
    SUBSET_SEED,
    DataError,
    HFImage,
    Sample,
    SamplePlan,
    _check_answer_type,
    _Pending,
    _typed_answer,
    _where,
    apply_sampling,
    clean_question,
    parse_choices,
    parse_sampling,
)

DEFAULT_HF_COLUMNS = {"image": "image", "question": "question", "answer": "answer"}
HF_FIELDS = ("image", "question", "answer", "choices", "id", "context", "category")
MULTI_IMAGE = ("error", "first")
_HF_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def _err(message: str, field: str) -> DataError:
    """A DataError tagged with the source key to fix ("config", "split", "hf", "columns.answer",
    "filter.data_type"), so `lmm-ray validate` can name the field of the sweep file."""
    e = DataError(message)
    e.field = field
    return e


def _describe(path_or_id, config: str | None, split: str) -> str:
    return f"{path_or_id} (" + (f"config {config!r}, " if config else "") + f"split {split!r})"


def _is_saved(p: Path) -> bool:
    return p.is_dir() and any((p / f).exists() for f in ("state.json", "dataset_dict.json"))


def _config_names(message: str, path_or_id: str, revision: str | None) -> list[str]:
    """The configs a 'Config name is missing' / 'BuilderConfig ... not found' error lists."""
    lists = re.findall(r"\[[^\[\]]*\]", message)
    try:
        names = ast.literal_eval(lists[-1]) if lists else None
        if isinstance(names, list):
            return [str(n) for n in names]
    except (ValueError, SyntaxError):
        pass
    try:
        import datasets

        return list(datasets.get_dataset_config_names(path_or_id, revision=revision))
    except Exception:  # noqa: BLE001 - only used to improve a message
        return []


def _open_hf(path_or_id: str, split: str, config: str | None = None, revision: str | None = None):
    import datasets  # optional dependency: only this loader needs it

    source = _describe(path_or_id, config, split)
    p = Path(path_or_id).expanduser()
    try:
        if config and _is_saved(p / config):
            p, config = p / config, None  # save_to_disk copies keep one folder per config
        if _is_saved(p):
            if config:
                raise _err(f"{source}: a save_to_disk folder has no configs and there is no subfolder "
                           f"{config!r}; save each config to <path>/<config>", "config")
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise _err(f"{path_or_id}: no split {split!r}; its splits are {sorted(ds)}", "split")
                ds = ds[split]
            return ds
        if p.is_file():
            builder = _HF_FILE_BUILDERS.get(p.suffix)
            if builder is None:
                raise DataError(f"{path_or_id}: cannot load a {p.suffix!r} file; expected one of {sorted(_HF_FILE_BUILDERS)}")
            return datasets.load_dataset(builder, data_files={split: str(p)}, split=split)
        if p.is_dir():  # a hub-like folder: data/<split>-*.parquet, or <config>/... with a README configs block
            return datasets.load_dataset(str(p), name=config, split=split)
        if p.is_absolute() or str(path_or_id).startswith((".", "~")):
            raise _err(f"{path_or_id}: dataset path not found", "hf")
        return datasets.load_dataset(path_or_id, name=config, split=split, revision=revision)  # a hub id
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; name the source either way
        msg = str(e)
        if "Config name is missing" in msg or ("BuilderConfig" in msg and "not found" in msg):
            names = _config_names(msg, path_or_id, revision)
            if config is None:
                raise _err(f"{source}: the dataset has several configs (subsets) and the source names none; "
                           f"set `config:` to one of {names}", "config") from None
            raise _err(f"{source}: config {config!r} not found; the dataset's configs are {names}", "config") from None
        if "Unknown split" in msg:
            raise _err(f"{source}: {msg}", "split") from None
        raise _err(f"{source}: could not load the dataset: {type(e).__name__}: {e}", "hf") from e


def _most_common(values: list) -> Any:
    # Counter keeps first-seen order among ties, so a tie goes to the earliest answer.
    values = [v for v in values if v is not None and str(v).strip()]
    return Counter(str(v).strip() for v in values).most_common(1)[0][0] if values else None


def _check_columns(columns: Any, source: str) -> dict:
    if columns is None:
        return dict(DEFAULT_HF_COLUMNS)
    if not isinstance(columns, dict):
        raise DataError(f"{source}: columns should map fields {HF_FIELDS} to column names, got {columns!r}")
    unknown = set(columns) - set(HF_FIELDS)
    if unknown:
        raise DataError(f"{source}: columns mapping has unknown field(s) {sorted(unknown)}; fields are {HF_FIELDS}")
    for fld, col in columns.items():
        ok = isinstance(col, str) and col or (fld == "choices" and isinstance(col, list) and len(col) >= 2
                                              and all(isinstance(c, str) and c for c in col))
        if not ok:
            raise DataError(f"{source}: columns.{fld} should be a column name"
                            + (" or a list of 2+ column names (one per option)" if fld == "choices" else "")
                            + f", got {col!r}")
    return {**DEFAULT_HF_COLUMNS, **columns}


def _check_filter(flt: Any, source: str) -> dict:
    scalar = (str, int, float, bool)
    if flt is None:
        return {}
    if not isinstance(flt, dict) or not flt or not all(
            isinstance(k, str) and (isinstance(v, scalar) or (isinstance(v, list) and v and all(isinstance(x, scalar) for x in v)))
            for k, v in flt.items()):
        raise DataError(f"{source}: filter should map column names to a value or a list of values "
                        f"(e.g. {{data_type: image}}), got {flt!r}")
    return flt


def _labels(ds, col: str, values: list) -> list:
    """ClassLabel integers -> their names; other columns as they are."""
    import datasets

    feat = ds.features.get(col)
    if isinstance(feat, datasets.ClassLabel):
        return [feat.int2str(v) if isinstance(v, int) and 0 <= v < feat.num_classes else v for v in values]
    return values


def _filter_rows(ds, flt: dict, source: str) -> list[int]:
    if not flt:
        return list(range(len(ds)))
    vals = {c: _labels(ds, c, v) for c, v in ds.select_columns(list(flt)).to_dict().items()}

    def match(v, want) -> bool:
        wants = want if isinstance(want, list) else [want]
        return any(v == w or (v is not None and str(v) == str(w)) for w in wants)

    rows = [i for i in range(len(ds)) if all(match(vals[c][i], w) for c, w in flt.items())]
    if not rows:
        seen = {c: sorted({str(v) for v in vals[c]})[:10] for c in flt}
        raise DataError(f"{source}: filter {flt!r} keeps no rows; values seen: {seen}")
    return rows


def _row_choices(text: dict, spec, j: int, where: str) -> tuple[str, ...]:
    if spec is None:
        return ()
    if isinstance(spec, str):
        v = text[spec][j]
        if v is None:
            return ()
        if not isinstance(v, (list, tuple)):
            raise DataError(f"{where}, field 'choices' (column {spec!r}): expected a list of options, got {v!r:.80}")
        return tuple(str(c).strip() for c in v)
    vals = [text[c][j] for c in spec]
    while vals and (vals[-1] is None or not str(vals[-1]).strip()):
        vals.pop()  # fewer options in this row
    if any(v is None or not str(v).strip() for v in vals):
        raise DataError(f"{where}, field 'choices' (columns {spec}): an empty option before the last one")
    return tuple(str(v).strip() for v in vals)


def _answer_letter(a: Any, choices: tuple[str, ...], where: str, col: str) -> str:
    """The option letter of an answer given as a letter, an index (int or digit string) or
    the option text. An index wins over text, so options ["1","2","3","4"] with answer "1" is B."""
    n, idx = len(choices), None
    if isinstance(a, float) and a.is_integer():
        a = int(a)
    if isinstance(a, int) and not isinstance(a, bool):
        idx = a
    elif isinstance(a, str):
        t = a.strip()
        if re.fullmatch(r"[A-Z]\.?", t) and ord(t[0]) - ord("A") < n:
            return t[0]
        if t.isdigit():
            idx = int(t)
        elif t in choices:
            idx = choices.index(t)
    if idx is None:
        raise DataError(f"{where}, field 'answer' (column {col!r}): {a!r:.80} is not an option letter, an index "
                        f"or the text of one of the {n} choices {list(choices)!r:.200}")
    if not 0 <= idx < n:
        raise DataError(f"{where}, field 'answer' (column {col!r}): index {idx} is outside the {n} choices "
                        f"(0..{n - 1})")
    return chr(ord("A") + idx)


def _opt_text(v: Any, where: str, fld: str, col: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}, field {fld!r} (column {col!r}): expected text, got {v!r:.80}")
    return v.strip()


def load_hf_dataset(path_or_id, **kw) -> list[Sample]:
    """Samples from a Hugging Face dataset (see the module docstring), every image opened; the
    options are those of `plan_hf_dataset`."""
    return plan_hf_dataset(path_or_id, **kw).samples()


def plan_hf_dataset(path_or_id, *, split: str = "train", config: str | None = None, revision: str | None = None,
                    columns: dict | None = None, filter: dict | None = None, multi_image: str | None = None,
                    n: int | str | None = None, seed: int = SUBSET_SEED, answer_type: str | None = None,
                    skill: str | None = None, meta: dict | None = None) -> SamplePlan:
    """The samples of a Hugging Face dataset as references (text checked, images not opened).
    `columns` maps our fields (image, question, answer; optional choices, id, context, category)
    to the dataset's columns. `n`: the first n rows, or a sampling strategy such as "random:500",
    drawn with `seed` after `filter`. `meta` is added to every sample's meta (e.g. the benchmark name)."""
    source = _describe(path_or_id, config, split)
    _check_answer_type(answer_type, source)
    cols = _check_columns(columns, source)
    flt = _check_filter(filter, source)
    if multi_image not in (None, *MULTI_IMAGE):
        raise DataError(f"{source}: multi_image {multi_image!r} should be one of {MULTI_IMAGE}")
    sampling = "all" if n is None else (f"first:{n}" if isinstance(n, int) else str(n))
    try:
        parse_sampling(sampling)
    except DataError as e:
        raise DataError(f"{source}: field 'n': {e}") from None

    ds = _open_hf(str(path_or_id), split, config, revision)
    check_columns(ds.column_names, cols, flt, source)
    wanted = [(f, c) for f, spec in cols.items() for c in (spec if isinstance(spec, list) else [spec])]
    rows = apply_sampling(_filter_rows(ds, flt, source), sampling, seed)
    sub = ds.select(rows)
    text_cols = list(dict.fromkeys(c for f, c in wanted if f != "image"))
    # Text columns first (no image decoding), so bad rows fail before any image is opened.
    text = {c: _labels(ds, c, v) for c, v in sub.select_columns(text_cols).to_dict().items()} if rows \
        else {c: [] for c in text_cols}
    default_id = f"{Path(str(path_or_id)).name}-" + (f"{config}-" if config else "") + split
    pending = []
    for j, i in enumerate(rows):
        rid = text[cols["id"]][j] if "id" in cols else None
        where = _where(source, i, rid)
        q = text[cols["question"]][j]
        if not isinstance(q, str) or not clean_question(q):
            raise DataError(f"{where}, field 'question' (column {cols['question']!r}): missing or empty")
        q = clean_question(q)
        context = _opt_text(text[cols["context"]][j], where, "context", cols["context"]) if "context" in cols else ""
        cat = text[cols["category"]][j] if "category" in cols else None
        category = "" if cat is None else str(cat).strip()  # a label, a type id, ...
        a = text[cols["answer"]][j]
        listed = ()
        if isinstance(a, (list, tuple)):
            listed = tuple(str(x).strip() for x in a if x is not None and str(x).strip())
            a = _most_common(a)
        if a is None or not str(a).strip():
            raise DataError(f"{where}, field 'answer' (column {cols['answer']!r}): missing or empty")
        given = _row_choices(text, cols.get("choices"), j, where)
        if given:
            if answer_type not in (None, "choice"):
                raise DataError(f"{where}: answer_type {answer_type!r} contradicts the choices column(s) "
                                f"{cols['choices']!r}; leave answer_type out (choices make it 'choice')")
            a = _answer_letter(a, given, where, cols["answer"])
            if not parse_choices(q):  # a choice question shows its options, as in the study's CUB format
                q += "\n" + "\n".join(f"{chr(ord('A') + k)}. {c}" for k, c in enumerate(given))
            kind, choices = "choice", given
        else:
            a, kind, choices = _typed_answer(where, "answer", str(a), q, answer_type)
        answers = listed if listed and kind != "choice" else (a,)
        pending.append(_Pending(where, None, q, a, kind, choices, skill or "",
                                str(rid) if rid not in (None, "") else f"{default_id}-{i}",
                                meta={"source": str(path_or_id), **({"config": config} if config else {}),
                                      "split": split, "index": i, **(meta or {})},
                                answers=answers, context=context, category=category))
    _attach_images(ds, rows, cols["image"], pending, path_or_id, multi_image)
    return SamplePlan(pending, source)


def check_columns(available: list[str], cols: dict, flt: dict, source: str) -> None:
    """Every column the column map and the filter name is in `available` (DataError tagged
    `columns.<field>` / `filter.<column>` otherwise)."""
    for fld, spec in cols.items():
        for col in spec if isinstance(spec, list) else [spec]:
            if col not in available:
                raise _err(f"{source}: column {col!r} (for field {fld!r}) is not in the dataset; its columns are "
                           f"{available}", f"columns.{fld}")
    for col in flt:
        if col not in available:
            raise _err(f"{source}: column {col!r} (for the filter) is not in the dataset; its columns are {available}",
                       f"filter.{col}")


def dataset_columns(path_or_id, *, split: str = "train", config: str | None = None,
                    revision: str | None = None) -> list[str] | None:
    """The columns of a dataset's split, reading no row: a local copy is opened (memory-mapped); a
    hub dataset's published schema is read (`load_dataset_builder(...).info`: the dataset card, no
    data files). None: the hub dataset publishes no schema. Raises DataError tagged with the
    source key at fault (config, split, hf), or ConnectionError when the hub is unreachable."""
    p = Path(str(path_or_id)).expanduser()
    if p.exists() or p.is_absolute() or str(path_or_id).startswith((".", "~")):
        return list(_open_hf(str(path_or_id), split, config, revision).column_names)
    import datasets

    source = _describe(path_or_id, config, split)
    try:
        builder = datasets.load_dataset_builder(str(path_or_id), name=config, revision=revision)
    except ConnectionError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; classify by message
        msg = str(e)
        if "Config name is missing" in msg or ("BuilderConfig" in msg and "not found" in msg):
            names = _config_names(msg, str(path_or_id), revision)
            if config is None:
                raise _err(f"{source}: the dataset has several configs (subsets) and the source names none; "
                           f"set `config:` to one of {names}", "config") from None
            raise _err(f"{source}: config {config!r} not found; the dataset's configs are {names}", "config") from None
        if "OfflineModeIsEnabled" in msg or "Couldn't reach" in msg:
            raise ConnectionError(msg) from None
        raise _err(f"{source}: no such dataset on the hub, or it cannot be read: {type(e).__name__}: {msg}",
                   "hf") from None
    splits = builder.info.splits
    if splits and split not in splits:
        raise _err(f"{source}: no split {split!r}; its splits are {sorted(splits)}", "split")
    return list(builder.info.features) if builder.info.features else None


def _attach_images(ds, rows: list[int], col: str, pending: list[_Pending], path_or_id, multi_image: str | None) -> None:
    """Point each pending row at its image cell (an HFImage), after checking list-of-images counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    base = Path(str(path_or_id)).expanduser() if Path(str(path_or_id)).expanduser().is_dir() else None
    if not pending:
        return
    # The image column alone, in arrow format: a row is read (not decoded) when it is opened.
    view = ds.select_columns([col]).with_format("arrow")
    atype = ds.data.schema.field(col).type
    if pa.types.is_list(atype) or pa.types.is_large_list(atype) or pa.types.is_fixed_size_list(atype):
        if getattr(ds, "_indices", None) is None:  # list lengths from the offsets only: no image bytes read
            lengths = pc.list_value_length(ds.data.column(col))
            counts = [lengths[i].as_py() for i in rows]
        else:
            counts = pc.list_value_length(ds.select(rows).with_format("arrow")[col]).to_pylist()
        for p, k in zip(pending, counts):
            if not k:
                raise DataError(f"{p.where}, field 'image' (column {col!r}): no image (empty list)")
            if k > 1 and multi_image != "first":
                raise DataError(f"{p.where}, field 'image' (column {col!r}): {k} images in one row, and lmm_ray "
                                f"gives the model one image per question; set `multi_image: first` to use the "
                                f"first one, or filter such rows out (SEED-Bench: `filter: {{data_type: image}}`)")
    for p, i in zip(pending, rows):
        p.image = HFImage(view, i, str(base) if base is not None else None)
        p.image_folder = str(base) if base is not None else ""


__all__ = ["DEFAULT_HF_COLUMNS", "HF_FIELDS", "MULTI_IMAGE", "check_columns", "dataset_columns", "load_hf_dataset",
           "plan_hf_dataset"]
