"""Score a predictions JSONL file with a named metric (`lmm-ray score`).

One JSON object a line: {"id", "prompt", "prediction", "answers", "choices", "category",
"score"}; only `prediction` (string) and `answers` (list of strings) are required. Blank lines
are skipped. Every mistake a user can fix raises `ScoreError` naming the line, the field and
the fix, before any number is printed.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmm_ray import metrics
from lmm_ray.errors import UserError
from lmm_ray.registry import UnknownName



class ScoreError(UserError, ValueError):
    """A predictions file or an argument the user can fix; the message says how."""


def _field_error(where: str, field: str, problem: str, example: str) -> ScoreError:
    return ScoreError(f"{where}: {problem}; write {field!r} as {example}")


def read_predictions(path: str | Path) -> tuple[list[dict], list[int]]:
    """The records of a predictions file and the line number of each (1-based)."""
    p = Path(path)
    if not p.is_file():
        raise ScoreError(f"predictions file {str(p)!r} not found; pass the path of a JSONL file "
                         'with one {"prediction": ..., "answers": [...]} object a line')
    records, lines = [], []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); "
                                 "each line must be one complete JSON object") from None
            if not isinstance(rec, dict):
                raise ScoreError(f"{where}: a line must be a JSON object, got {type(rec).__name__}")
            _check(rec, where)
            records.append(rec)
            lines.append(n)
    if not records:
        raise ScoreError(f"{p}: no predictions in the file; it needs one JSON object a line")
    return records, lines


def _check(rec: dict, where: str) -> None:
    """Check the fields the metrics read; a JSON number among answers or choices becomes its
    string (ScienceQA stores the gold index as an int)."""
    for field in ("prediction", "answers"):
        if field not in rec:
            raise ScoreError(f"{where}: missing field {field!r}; every line needs "
                             '"prediction" (a string) and "answers" (a list of strings)')
    if not isinstance(rec["prediction"], str):
        raise _field_error(where, "prediction", f"'prediction' is {type(rec['prediction']).__name__}",
                           'a string, e.g. "prediction": "B"')
    for field in ("answers", "choices"):
        v = rec.get(field)
        if v is None and field == "choices":
            continue
        if not isinstance(v, list) or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                              for a in v):
            raise _field_error(where, field, f"{field!r} is not a list of strings",
                               f'a list, e.g. "{field}": ["B"]')
        rec[field] = [a if isinstance(a, str) else str(a) for a in v]
    if not rec["answers"]:
        raise _field_error(where, "answers", "'answers' is empty", 'at least one answer, e.g. ["B"]')
    if rec.get("category") is not None and not isinstance(rec["category"], (str, int)):
        raise _field_error(where, "category", "'category' is not a string", '"category": "math"')


def score_file(path: str | Path, metric: str, aggregation: str = "mean") -> dict:
    """`metrics.score` of a predictions file, plus "path"; raises ScoreError for user mistakes."""
    try:  # check the names first, so a typo costs no read of a large file
        metrics.METRICS.get(metric)
        metrics.AGGREGATIONS.get(aggregation)
    except UnknownName as e:
        raise ScoreError(str(e)) from None
    records, lines = read_predictions(path)
    try:
        result = metrics.score(records, metric, aggregation)
    except metrics.RecordError as e:
        raise ScoreError(f"{path}:{lines[e.index]}: {e.detail}") from None
    return {**result, "path": str(path)}


def format_result(r: dict) -> str:
    """One human line, then one line a category."""
    value = "n/a" if r["score"] is None else f"{r['score']:.2f}"
    skipped = f" ({r['skipped']} not counted by this metric)" if r["skipped"] else ""
    out = [f"{r['metric']} ({r['aggregation']}): {value} on {r['n']} predictions{skipped}  [{r['path']}]"]
    for cat, c in r["by_category"].items():
        out.append(f"  {cat}: {c['score']:.2f} (n={c['n']})")
    return "\n".join(out)
