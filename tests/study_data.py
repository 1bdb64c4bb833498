"""Placeholders for the study sweeps' local files (~/lmm_data/...): one valid LLaVA record of the
source's answer type and its image, so `validate` (which opens data files) passes offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image


def local_paths(node) -> list[str]:
    """Every local path value of a data source (llava_json, dataset_yaml, image_folder) in a raw sweep."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("llava_json", "dataset_yaml", "image_folder") and isinstance(v, str):
                out.append(v)
            else:
                out += local_paths(v)
    elif isinstance(node, list):
        for v in node:
            out += local_paths(v)
    return out


def write_placeholders(raw: dict) -> list[str]:
    """Write them under the current HOME; returns the paths (as written in the sweep)."""
    answer = {"choice": "A", "number": "3", "time": "3:45"}
    types = {s["data"]["llava_json"]: s["data"].get("answer_type") for s in raw["stages"]
             if "llava_json" in (s.get("data") or {})}
    local = local_paths(raw)
    for p in local:
        full = Path(os.path.expanduser(p))
        if full.suffix:
            full.parent.mkdir(parents=True, exist_ok=True)
            full.write_text(json.dumps([{"id": "p", "image": "placeholder.png", "conversations": [
                {"from": "human", "value": "<image>\nWhich?\nA. one\nB. two"},
                {"from": "gpt", "value": answer.get(types.get(p), "A")}]}]))
        else:
            full.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(full / "placeholder.png")
    return local
