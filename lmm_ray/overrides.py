"""`key=value` overrides of a sweep file (`lmm-ray sweep FILE search.num_trials=4 stages.0.steps=50`).

Applied to the raw mapping before validation (config.load_sweep): a dotted path (list entries by
index) and a value parsed as YAML. An empty value (`key=`) removes the key, so its default
applies; `key=null` sets null. See docs/sweep_config.md, "Overrides".
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from lmm_ray.errors import ConfigError
from lmm_ray.registry import did_you_mean
from lmm_ray.schema import read_yaml, resolve_path, tname

_DEFAULT = object()  # the value of an empty override (`key=`): the key is removed, so its default applies
_REQUIRED = {  # keys without a default: an empty override is refused with what to give instead
    "name": "give a name: name=my_sweep",
    "model": "give a model: model=tiny:qwen2_5_vl, model=base:qwen2_5_vl@ci, a hub id (owner/name) or a local folder",
    "stages": "give the stages: 'stages=[{skill: count, steps: 120}]'",
    "search_space": "give a search space file or mapping: search_space=search_spaces/study_recipes.yaml",
    "search_space.recipe": "give a recipe: search_space.recipe=sa_proj or 'search_space.recipe={choice: [sa_proj, mlp]}'",
    "search_space.lr": "give a learning rate: search_space.lr=1.0e-3 or 'search_space.lr={loguniform: [1.0e-4, 1.0e-3]}'",
}


def apply(raw: dict, overrides, allowed: dict, base_dir: Path | None = None) -> dict:
    """A copy of the raw sweep dict with `key=value` overrides applied (dotted paths, list
    indices, values parsed as YAML). A search_space given as a file is inlined when overridden.
    `allowed`: the valid keys under each generic path (config._OVERRIDE_KEYS)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, eq, value_text = str(text).partition("=")
        key = key.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", key):
            raise ConfigError("overrides", f"bad override {text!r}",
                              "write key=value with a dotted key, e.g. search.num_trials=4 or stages.0.steps=50")
        if not value_text.strip():  # `key=`: back to the default (`key=null` sets null)
            if key in _REQUIRED:
                raise ConfigError(key, f"`{key}=` (empty) would remove it, but a sweep has no default {key}",
                                  _REQUIRED[key])
            value = _DEFAULT
        else:
            try:
                value = yaml.safe_load(value_text)
            except yaml.YAMLError as e:
                raise ConfigError(key, f"override value {value_text!r} is not valid YAML ({e.problem})",
                                  "quote it or fix the YAML, e.g. key='{loguniform: [1.0e-4, 1.0e-3]}'") from None
        _set(raw, key.split("."), value, allowed, base_dir)
    return raw


def _set(raw: dict, parts: list[str], value, allowed_keys: dict, base_dir):
    node, trail = raw, []
    for i, part in enumerate(parts):
        here = ".".join([*trail, part])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(here, f"unknown override path: {'.'.join(trail)} has {len(node)} entries",
                                  f"use an index from 0 to {len(node) - 1}")
            key = int(part)
        elif isinstance(node, dict):
            generic = tuple("*" if t.isdigit() else t for t in trail)
            allowed = allowed_keys.get(generic)
            if allowed is not None and part not in allowed:
                hint = did_you_mean(part, allowed).strip()
                raise ConfigError(here, f"unknown override path {'.'.join(parts)!r}",
                                  f"{hint + ' ' if hint else ''}Valid keys under {'.'.join(trail) or 'the top level'}: {', '.join(allowed)}")
            key = part
        else:
            raise ConfigError(here, f"cannot set {'.'.join(parts)!r}: {'.'.join(trail)} is {tname(node)} {node!r}, not a mapping or list",
                              f"override the whole value: {'.'.join(trail)}=...")
        if i == len(parts) - 1:
            if value is not _DEFAULT:
                node[key] = value
            elif isinstance(node, dict):
                node.pop(key, None)
            else:
                raise ConfigError(here, f"`{'.'.join(parts)}=` (empty) cannot remove a list entry",
                                  f"override the whole list: {'.'.join(trail)}=[...]")
            return
        child = node.get(key) if isinstance(node, dict) else node[key]
        if child is None:
            child = node[key] = {}
        elif trail == [] and key == "search_space" and isinstance(child, str):
            path = resolve_path(child, base_dir)
            child = node[key] = read_yaml(path, "search_space")
        node, trail = child, [*trail, part]
