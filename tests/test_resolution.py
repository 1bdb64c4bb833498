"""Resolution caps: the `data` section, lmms-eval's Qwen2.5-VL defaults for real checkpoints, what
a cap does per family, and the caps a family cannot honour."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from PIL import Image

from lmm_ray import config, data, models, resolution, trial
from lmm_ray.errors import ConfigError
from lmm_ray.schema import DataConfig
from lmm_ray.skills.schema import Sample

SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"


# Caps mutate the processor: each test builds its own tiny model (the session's `tiny` fixture
# shares one processor between tests).


def _tokens(grid_thw) -> int:
    return int(grid_thw.prod()) // 4  # 2x2 merge


def test_real_qwen_gets_lmms_eval_caps_and_tiny_models_keep_theirs():
    assert resolution.caps("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct") == {"max_pixels": 1605632, "min_pixels": 200704}
    assert resolution.caps("qwen2_5_vl", "/ckpt/my-qwen") == {"max_pixels": 1605632, "min_pixels": 200704}
    assert resolution.caps("qwen2_5_vl", "base:qwen2_5_vl@ci") == {}
    assert resolution.caps("qwen2_5_vl", "tiny:qwen2_5_vl") == {}
    assert resolution.caps("qwen2_5_vl", "tiny:qwen2_5_vl", max_pixels=8192) == {"max_pixels": 8192}
    assert resolution.caps("llava_onevision", "llava-hf/llava-onevision-qwen2-7b-ov-hf") == {}
    assert resolution.caps("qwen2_5_vl", "Qwen/x", max_pixels=100_000) == {"max_pixels": 100_000, "min_pixels": 100_000}


def test_capped_real_qwen_processor_bounds_visual_tokens():
    """A processor like the checkpoint's (patch 14; its preprocessor_config.json says
    max_pixels 12845056, min_pixels 3136) under the default caps:
    a 1700x2200 page drops from ~4,800 to <= 2,048 tokens, a 100x100 icon rises to >= 256."""
    _, mconf = models.model_config("Qwen/Qwen2.5-VL-7B-Instruct", offline=True)
    proc = SimpleNamespace(image_processor=T.Qwen2VLImageProcessorPil(max_pixels=12845056, min_pixels=3136))
    loaded = SimpleNamespace(family=SimpleNamespace(name="qwen2_5_vl"), ref="Qwen/Qwen2.5-VL-7B-Instruct",
                             processor=proc, model=SimpleNamespace(config=mconf))
    page, icon = Image.new("RGB", (1700, 2200)), Image.new("RGB", (100, 100))
    before = _tokens(proc.image_processor(images=[page], return_tensors="pt")["image_grid_thw"])
    assert before > 4000
    assert resolution.apply(loaded) == {"max_pixels": 1605632, "min_pixels": 200704}
    after = _tokens(proc.image_processor(images=[page], return_tensors="pt")["image_grid_thw"])
    small = _tokens(proc.image_processor(images=[icon], return_tensors="pt")["image_grid_thw"])
    assert 1500 < after <= 2048 and 256 <= small < 300, (after, small)


def test_a_tiny_model_saved_to_a_folder_keeps_its_processor():
    """A folder ref looks like a real checkpoint, but its processor allows 64x64 pixels only: the
    default (which only lowers a processor allowing more) leaves it alone; an explicit cap applies."""
    q = models.build_tiny("qwen2_5_vl")
    q.ref = "/runs/final/my_trained_tiny"
    assert resolution.apply(q) == {}
    size = q.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (64 * 64, 64 * 64)
    assert resolution.apply(q, max_pixels=128 * 128) == {"max_pixels": 128 * 128, "min_pixels": 128 * 128}


def test_caps_reach_the_tiny_processors_and_the_models_still_run():
    wide = Sample(Image.new("RGB", (400, 200), (90, 30, 200)), "what?", "five")
    # Qwen: 4x the pixels of the tiny default -> ~4x the tokens
    q = models.build_tiny("qwen2_5_vl")
    n0 = data.encode_prompt_one(q.processor, wide)["input_ids"].shape[1]
    resolution.apply(q, max_pixels=4 * 64 * 64, min_pixels=4 * 64 * 64)
    enc = data.encode_train_one(q.processor, wide)
    assert enc["input_ids"].shape[1] > n0 + 30
    assert torch.isfinite(q.model(**enc).loss)
    # InternVL: max_pixels = 3 tiles -> up to 3 tiles + a thumbnail
    iv = models.build_tiny("internvl")
    resolution.apply(iv, max_pixels=3 * 64 * 64)
    enc = data.encode_train_one(iv.processor, wide)
    assert iv.processor.image_processor.max_patches == 3 and enc["pixel_values"].shape[0] == 3
    assert torch.isfinite(iv.model(**enc).loss)


def test_llava_onevision_cap_shrinks_the_grids_of_processor_and_model():
    ov = models.build_tiny("llava_onevision")
    grids = [[64, 64], [64, 128], [128, 128], [128, 256]]
    ov.processor.image_processor.image_grid_pinpoints = grids
    ov.model.config.image_grid_pinpoints = grids
    resolution.apply(ov, max_pixels=128 * 128)
    assert ov.processor.image_processor.image_grid_pinpoints == grids[:3] == ov.model.config.image_grid_pinpoints
    enc = data.encode_train_one(ov.processor, Sample(Image.new("RGB", (100, 300)), "q?", "a"))
    assert enc["pixel_values"].shape[1] <= 1 + 4  # base view + at most 2x2 crops
    assert torch.isfinite(ov.model(**enc).loss)


@pytest.mark.parametrize("family,kw,field,text", [
    ("llava", {"max_pixels": 10**6}, "data.max_pixels", "LLaVA-1.5 resizes every image"),
    ("llava_onevision", {"min_pixels": 1000}, "data.min_pixels", "base view is always"),
    ("llava_onevision", {"max_pixels": 1000}, "data.max_pixels", "below the smallest anyres grid"),
    ("internvl", {"max_pixels": 1000}, "data.max_pixels", "below one 448x448 tile"),
])
def test_caps_a_family_cannot_honour_are_refused(family, kw, field, text):
    ref = {"llava": "llava-hf/llava-1.5-7b-hf", "llava_onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
           "internvl": "OpenGVLab/InternVL3-8B-hf"}[family]
    mconf = models.model_config(ref, offline=True)[1] if family != "llava" else SimpleNamespace()
    with pytest.raises(ConfigError) as e:
        resolution.check(family, mconf, kw.get("max_pixels"), kw.get("min_pixels"))
    assert e.value.field == field and text in str(e.value) and e.value.fix


def test_data_section_parses_round_trips_and_reaches_the_trial():
    cfg = config.load_sweep(SMOKE, ["data.max_pixels=1605632", "data.min_pixels=200704", "data.num_workers=2"])
    assert (cfg.data.max_pixels, cfg.data.min_pixels, cfg.data.num_workers) == (1605632, 200704, 2)
    assert config.parse_sweep(cfg.to_dict()) == cfg
    spec = trial.trial_spec(cfg, {**cfg.search_space.example(), "lr": 1e-3})
    assert trial.TrialSpec.from_dict(spec.to_dict()).data == cfg.data
    assert config.load_sweep(SMOKE).data == DataConfig()


@pytest.mark.parametrize("overrides,field,text", [
    (["data.min_pixels=4096", "data.max_pixels=1024"], "data.min_pixels", "above data.max_pixels"),
    (["data.max_pixels=0"], "data.max_pixels", "out of range"),
    (["data.num_workers=-1"], "data.num_workers", "out of range"),
    (["data.max_pixel=5"], "data.max_pixel", "Did you mean 'max_pixels'?"),
])
def test_bad_data_section_is_refused(overrides, field, text):
    with pytest.raises(ConfigError) as e:
        config.load_sweep(SMOKE, overrides)
    assert e.value.field == field and text in str(e.value)
