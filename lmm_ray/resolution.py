"""Image resolution caps (`data.max_pixels` / `data.min_pixels`): what they mean per family, their
defaults, and how they reach the processor (and, for LLaVA-OneVision, the model's config).

Unbounded images are the first memory and compute cost of real data: an uncapped Qwen2.5-VL
processor turns a 1700x2200 DocVQA page into 4,819 visual tokens (86 MB of fp32 pixel values),
and lmms-eval numbers are only comparable at lmms-eval's caps. What a cap means:

| family | max_pixels | min_pixels | default |
|---|---|---|---|
| qwen2_5_vl | the image is resized (aspect kept, sides multiples of 28) to at most this many pixels: tokens <= max_pixels / 784 | ... to at least this many | lmms-eval's `qwen2_5_vl`: max 1605632 (2048 tokens), min 200704 (256*28*28) |
| llava_onevision | only "anyres" grids (`image_grid_pinpoints`) of at most this many pixels are kept, in the processor *and* the model config (both pick the grid): crops <= max_pixels / 384^2, plus the base view | not applicable (the base view is always the tower's size) | none: the checkpoint's grids (up to 2304x2304, 36 crops), as lmms-eval |
| internvl | tiles of the tower's size (448^2) per image: max_patches = max_pixels // 448^2 (a thumbnail is added when > 1) | min_patches = ceil(min_pixels / 448^2) | none: the checkpoint's (max 12 tiles) |
| llava | not applicable: LLaVA-1.5 resizes every image to the tower's size | not applicable | - |

Tiny and base models keep their own tiny processors (64 px images) unless a cap is given
explicitly: the Qwen default only ever lowers a processor that allows more than lmms-eval's
max_pixels, so a `tiny:`/`base:` model, or one saved to a folder by `lmm-ray train`, is left as
it is.
"""

from __future__ import annotations

import math
from typing import Any

from lmm_ray.errors import ConfigError

# lmms-eval lmms_eval/models/simple/qwen2_5_vl.py: max_pixels=1605632, min_pixels=256*28*28
QWEN_MAX_PIXELS = 1605632
QWEN_MIN_PIXELS = 256 * 28 * 28
SUPPORTED = {"qwen2_5_vl": ("max_pixels", "min_pixels"), "llava_onevision": ("max_pixels",),
             "internvl": ("max_pixels", "min_pixels"), "llava": ()}


def is_real(model_ref: str) -> bool:
    """A hub id or a local checkpoint (not `tiny:` / `base:`, which keep their tiny processors)."""
    return not str(model_ref).startswith(("tiny:", "base:"))


def caps(family: str, model_ref: str, max_pixels: int | None = None, min_pixels: int | None = None,
         processor_max: int | None = None) -> dict:
    """The caps that apply: the given ones, else the family's default for real checkpoints whose
    processor (`processor_max`: its max_pixels, when known) allows more than the default.
    {} means "the processor as it is"."""
    out = {k: v for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v is not None}
    if processor_max is not None and processor_max <= QWEN_MAX_PIXELS and not out:
        return out  # already capped at least as tightly (a saved tiny/base model, or the user's own cap)
    if family == "qwen2_5_vl" and is_real(model_ref):
        out.setdefault("max_pixels", max(QWEN_MAX_PIXELS, out.get("min_pixels", 0)))
        out.setdefault("min_pixels", min(QWEN_MIN_PIXELS, out["max_pixels"]))
    return out


def check(family: str, model_config: Any, max_pixels: int | None, min_pixels: int | None, where: str = "data") -> None:
    """ConfigError (field `data.max_pixels` / `data.min_pixels`) for a cap the family cannot honour."""
    given = {k: v for k, v in (("max_pixels", max_pixels), ("min_pixels", min_pixels)) if v is not None}
    for key in given:
        if key not in SUPPORTED.get(family, ()):
            why = {"llava": "LLaVA-1.5 resizes every image to its vision tower's size",
                   "llava_onevision": "LLaVA-OneVision's base view is always its vision tower's size; only the "
                                      "anyres grids shrink (max_pixels)"}.get(family, "the family has no such knob")
            raise ConfigError(f"{where}.{key}", f"has no effect on {family} models: {why}", f"remove {where}.{key}")
    if family == "llava_onevision" and max_pixels is not None:
        grids = getattr(model_config, "image_grid_pinpoints", None) or []
        smallest = min((w * h for w, h in grids), default=0)
        if grids and max_pixels < smallest:
            raise ConfigError(f"{where}.max_pixels", f"{max_pixels} is below the smallest anyres grid of the model "
                              f"({smallest} pixels)", f"use max_pixels >= {smallest}")
    if family == "internvl" and max_pixels is not None:
        tile = _intern_tile(model_config)
        if max_pixels < tile * tile:
            raise ConfigError(f"{where}.max_pixels", f"{max_pixels} is below one {tile}x{tile} tile",
                              f"use max_pixels >= {tile * tile} (each tile is {tile}x{tile})")
    if family == "qwen2_5_vl" and max_pixels is not None:
        vc = getattr(model_config, "vision_config", None)
        factor = getattr(vc, "patch_size", 14) * getattr(vc, "spatial_merge_size", 2)
        if max_pixels < factor * factor:
            raise ConfigError(f"{where}.max_pixels", f"{max_pixels} is below one {factor}x{factor} token",
                              f"use max_pixels >= {factor * factor}")


def _intern_tile(model_config) -> int:
    size = getattr(getattr(model_config, "vision_config", None), "image_size", 448)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def apply(loaded, max_pixels: int | None = None, min_pixels: int | None = None) -> dict:
    """Set the caps on a loaded model's processor (and LLaVA-OneVision's config); returns the caps
    applied ({} if none). Call it once after `models.load_model`, before any encoding."""
    fam = loaded.family.name
    ip = loaded.processor.image_processor
    size = getattr(ip, "size", None) or {}
    proc_max = size.get("longest_edge") if fam == "qwen2_5_vl" and hasattr(size, "get") else None
    cs = caps(fam, loaded.ref, max_pixels, min_pixels, processor_max=proc_max)
    if not cs:
        return {}
    check(fam, loaded.model.config, cs.get("max_pixels"), cs.get("min_pixels"))
    if fam == "qwen2_5_vl":
        size = dict(shortest_edge=cs.get("min_pixels", ip.size["shortest_edge"]),
                    longest_edge=cs.get("max_pixels", ip.size["longest_edge"]))
        try:
            ip.size = type(ip.size)(**size)  # transformers' SizeDict
        except TypeError:
            ip.size = size
        for k, v in cs.items():  # older processors read the attributes
            if hasattr(ip, k):
                setattr(ip, k, v)
    elif fam == "llava_onevision":
        # The processor counts image tokens and the model cuts patches from the same grid list:
        # both must shrink together, or the token and feature counts disagree.
        kept = [g for g in ip.image_grid_pinpoints if g[0] * g[1] <= cs["max_pixels"]]
        ip.image_grid_pinpoints = kept
        loaded.model.config.image_grid_pinpoints = kept
    elif fam == "internvl":
        tile = int(ip.size["height"])
        if "max_pixels" in cs:
            ip.max_patches = max(1, cs["max_pixels"] // (tile * tile))
        if "min_pixels" in cs:
            ip.min_patches = min(max(1, math.ceil(cs["min_pixels"] / (tile * tile))), ip.max_patches)
    return cs


def describe(family: str, model_ref: str, max_pixels: int | None = None, min_pixels: int | None = None) -> str:
    """One line for the plan: the caps in force and what they mean for this family."""
    cs = caps(family, model_ref, max_pixels, min_pixels)
    if not cs:
        return "the processor's own" + (" (tiny/base model)" if not is_real(model_ref) else "")
    parts = [f"{k} {v:,}" for k, v in cs.items()]
    if family == "qwen2_5_vl" and "max_pixels" in cs and is_real(model_ref):  # 28x28 pixels a token
        parts.append(f"<= {cs['max_pixels'] // 784:,} visual tokens per image")
    return ", ".join(parts)


__all__ = ["QWEN_MAX_PIXELS", "QWEN_MIN_PIXELS", "SUPPORTED", "apply", "caps", "check", "describe", "is_real"]
