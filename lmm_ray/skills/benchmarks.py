"""Benchmark presets: the study's evaluation sets as data (benchmarks.yaml).

A data source `{benchmark: ai2d, path: ..., n: ...}` resolves to the hub id (or the local copy
in `path`), config, split, column map, row filter and answer type of the preset, plus what the
evaluator needs (metric, aggregation, prompts, max_new_tokens). Every preset is checked when
this module is imported, so a typo in benchmarks.yaml fails at once, with the preset's name.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from lmm_ray.registry import Registry, UnknownName
from lmm_ray.skills.loaders import DataError, parse_sampling
from lmm_ray.skills.schema import ANSWER_TYPES

PRESET_FILE = Path(__file__).with_name("benchmarks.yaml")
METRICS = ("exact", "choice", "anls", "relaxed", "vqa", "clock", "number", "pathvqa_exact")
AGGREGATIONS = ("mean", "macro")
ROLES = ("heldout", "target")
REQUIRED_KEYS = ("task", "role", "hf", "split", "metric", "aggregation", "max_new_tokens")
OPTIONAL_KEYS = ("config", "revision", "columns", "filter", "multi_image", "answer_type", "pre_prompt",
                 "post_prompt", "context_template")
# What a data source may add to a preset (the rest is the preset's).
SOURCE_KEYS = ("benchmark", "path", "split", "revision", "n", "seed", "skill")


def check_preset(name: str, spec: Any, where: str = "benchmark preset") -> dict:
    """The preset with defaults filled in; DataError naming the preset and the key otherwise."""
    from lmm_ray.skills.hub import MULTI_IMAGE, _check_columns, _check_filter

    at = f"{where} {name!r}"
    if not isinstance(spec, dict):
        raise DataError(f"{at}: expected a mapping of {REQUIRED_KEYS + OPTIONAL_KEYS}, got {spec!r:.80}")
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    unknown = sorted(set(spec) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise DataError(f"{at}: " + (f"missing key(s) {missing}" if missing else "")
                        + ("; " if missing and unknown else "") + (f"unknown key(s) {unknown}" if unknown else "")
                        + f"; keys are {REQUIRED_KEYS} and optionally {OPTIONAL_KEYS}")
    for key in ("task", "hf", "split", "config", "revision", "pre_prompt", "post_prompt", "context_template"):
        if key in spec and not isinstance(spec[key], str):
            raise DataError(f"{at}: {key} should be a string, got {spec[key]!r}")
    choices = {"role": ROLES, "metric": METRICS, "aggregation": AGGREGATIONS, "multi_image": MULTI_IMAGE,
               "answer_type": ANSWER_TYPES}
    for key, allowed in choices.items():
        if spec.get(key) is not None and spec[key] not in allowed:
            raise DataError(f"{at}: {key} {spec[key]!r} is not one of {allowed}")
    m = spec["max_new_tokens"]
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise DataError(f"{at}: max_new_tokens should be a positive integer, got {m!r}")
    cols = _check_columns(spec.get("columns"), at)
    _check_filter(spec.get("filter"), at)
    if spec["aggregation"] == "macro" and "category" not in cols:
        raise DataError(f"{at}: aggregation 'macro' averages over categories; set columns.category")
    if "context_template" in spec and ("context" not in cols or "{context}" not in spec["context_template"]):
        raise DataError(f"{at}: context_template needs columns.context and a '{{context}}' in the template")
    return {"pre_prompt": "", "post_prompt": "", **copy.deepcopy(spec)}


def load_presets(path: Path | str = PRESET_FILE) -> Registry[dict]:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read the benchmark presets: {e}") from None
    if not isinstance(doc, dict) or not doc:
        raise DataError(f"{path}: expected a mapping of benchmark name -> preset")
    reg: Registry[dict] = Registry("benchmark")
    for name, spec in doc.items():
        reg.register(str(name), check_preset(str(name), spec, f"{path.name}:"))
    return reg


BENCHMARKS: Registry[dict] = load_presets()


def names(role: str | None = None) -> list[str]:
    """Preset names, all or those of one role (heldout | target)."""
    return [n for n, s in BENCHMARKS.items() if role is None or s["role"] == role]


def get(name: Any) -> dict:
    """A copy of one preset; an unknown name raises DataError listing the valid ones."""
    try:
        return copy.deepcopy(BENCHMARKS.get(str(name)))
    except UnknownName as e:
        raise DataError(str(e)) from None


def resolve(source: dict | str) -> dict:
    """A benchmark source -> one flat dict: the `hf` source keys the loader reads (hf, config,
    split, revision, columns, filter, multi_image, answer_type, n, seed, skill) plus `benchmark`,
    `hub_id`, `task`, `role` and the evaluation keys (metric, aggregation, pre_prompt,
    post_prompt, context_template, max_new_tokens). `path` replaces the hub id with a local copy
    (a relative path resolves against the working directory); `split`, `revision`, `n`, `seed`
    and `skill` override the preset's."""
    if isinstance(source, str):
        source = {"benchmark": source}
    if not isinstance(source, dict) or "benchmark" not in source:
        raise DataError(f"benchmark source {source!r}: expected {{benchmark: name, ...}}")
    extra = sorted(set(source) - set(SOURCE_KEYS))
    if extra:
        raise DataError(f"benchmark source {source!r}: unknown key(s) {extra}; allowed: {list(SOURCE_KEYS)}")
    name = source["benchmark"]
    out = {"benchmark": str(name), "hub_id": None, **get(name)}
    out["hub_id"] = out["hf"]
    for key in ("split", "revision"):
        if source.get(key) is not None:
            if not isinstance(source[key], str):
                raise DataError(f"benchmark source {source!r}: {key} should be a string")
            out[key] = source[key]
    if source.get("path") is not None:
        if not isinstance(source["path"], str) or not source["path"].strip():
            raise DataError(f"benchmark source {source!r}: path should be a local folder or file")
        out["hf"] = str(Path(source["path"]).expanduser().resolve())
        out.pop("revision", None)  # a local copy has no revisions
    if source.get("n") is not None:
        n = source["n"]
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            parse_sampling(str(n))
        out["n"] = n
    if "seed" in source:
        out["seed"] = source["seed"]
    out["skill"] = source.get("skill") or str(name)
    return out


__all__ = ["AGGREGATIONS", "BENCHMARKS", "METRICS", "PRESET_FILE", "ROLES", "check_preset", "get",
           "load_presets", "names", "resolve"]
