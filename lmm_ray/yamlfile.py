"""Reading the YAML files a user writes (sweeps, search spaces, recipes), strictly.

PyYAML keeps the last of two equal keys without a word: a missing `-` in `stages:` silently drops
a stage, a second `search:` block silently replaces the first. Here a repeated key is an error
naming both lines. Files are read as UTF-8 (a byte-order mark is fine); anything else is an
error that says how to re-save the file, not a UnicodeDecodeError traceback.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lmm_ray.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML's own error follows
            break
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (lines {first + 1} and {key_node.start_mark.line + 1}); "
                "the second would silently replace the first", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def loads(text: str, source: str = "<text>"):
    """Parse YAML text strictly; errors are ConfigErrors naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:
        if "appears twice" in str(e.problem):
            raise ConfigError("", str(e.problem), "remove or merge one of the two (a list item needs its own `- `)",
                              source=source) from None
        raise ConfigError("", f"not valid YAML: {e}", "fix the YAML at the position shown", source=source) from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"not valid YAML: {e}", "fix the YAML syntax at the position shown", source=source) from None


def load(path: str | Path):
    """A YAML file, strictly (see the module docstring)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError("", f"is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line})",
                          "save the file as UTF-8 (most editors: File > Save with encoding > UTF-8)",
                          source=str(path)) from None
    return loads(text, str(path))
