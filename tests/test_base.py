"""The embedded base model: built on the held-out skills only, cached by a key, verified before use."""

from __future__ import annotations

import json
import time

import pytest

from lmm_ray import base, cli, skills
from lmm_ray.families import TinySize

# A build small enough to run many times in a test (seconds): the cache logic does not care.
TINY_PRESET = base.Preset(TinySize(hidden=32, layers=1, intermediate=64, vision_hidden=32, vision_layers=1),
                          steps=3, batch_size=4, lr=1e-3, n_per_skill=4, eval_n=2)


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMM_RAY_CACHE", str(tmp_path))
    monkeypatch.setitem(base.PRESETS, "unit", TINY_PRESET)
    calls = []
    real = base.build

    def counting_build(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(base, "build", counting_build)
    return tmp_path, calls


def test_build_then_cache_hit(tiny_cache):
    _, calls = tiny_cache
    path = base.ensure("base:qwen2_5_vl@unit", quiet=True)
    assert len(calls) == 1 and base.verify(path) is None
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "base_info.json", base.MANIFEST):
        assert (path / f).is_file(), f
    t0 = time.perf_counter()
    assert base.ensure("base:qwen2_5_vl@unit", quiet=True) == path
    assert len(calls) == 1, "a second call must come from the cache"
    assert time.perf_counter() - t0 < 5
    info = json.loads((path / "base_info.json").read_text())
    # Pre-trained on the held-out skills only: the key lists them and no target skill.
    assert set(info["key"]["skills"]) == set(skills.heldout_skills())
    assert not set(info["key"]["skills"]) & set(skills.target_skills())


@pytest.mark.parametrize("damage", ["delete_weights", "edit_config", "no_manifest", "bad_manifest"])
def test_damaged_cache_is_detected_and_rebuilt(tiny_cache, damage):
    _, calls = tiny_cache
    path = base.ensure("base:qwen2_5_vl@unit", quiet=True)
    if damage == "delete_weights":
        (path / "model.safetensors").unlink()
    elif damage == "edit_config":
        cfg = json.loads((path / "config.json").read_text())
        cfg["note"] = "edited"
        (path / "config.json").write_text(json.dumps(cfg))
    elif damage == "no_manifest":  # what an interrupted build leaves
        (path / base.MANIFEST).unlink()
    else:
        (path / base.MANIFEST).write_text("{not json")
    assert base.verify(path) is not None
    base.ensure("base:qwen2_5_vl@unit", quiet=True)
    assert len(calls) == 2, "a damaged entry must be rebuilt, never loaded"
    assert base.verify(path) is None


def test_interrupted_build_leaves_no_entry(tiny_cache, monkeypatch):
    from lmm_ray import models

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.Loaded, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        base.ensure("base:qwen2_5_vl@unit", quiet=True)
    assert base.verify(base.folder("qwen2_5_vl", "unit")) == "not built"


def test_key_changes_with_everything_that_determines_the_model(tiny_cache, monkeypatch):
    a = base.folder("qwen2_5_vl", "unit")
    assert base.folder("internvl", "unit") != a
    monkeypatch.setitem(base.PRESETS, "unit", base.Preset(TINY_PRESET.size, steps=4, batch_size=4, lr=1e-3, n_per_skill=4))
    assert base.folder("qwen2_5_vl", "unit") != a
    monkeypatch.setattr(base, "_source_hash", lambda: "other-generators")
    monkeypatch.setitem(base.PRESETS, "unit", TINY_PRESET)
    assert base.folder("qwen2_5_vl", "unit") != a


def test_refs_and_errors():
    assert base.parse_ref("base:qwen2_5_vl") == ("qwen2_5_vl", "quickstart")
    assert base.parse_ref("base:internvl") == ("internvl", "ci")
    assert base.parse_ref("base:llava_onevision@ci") == ("llava_onevision", "ci")
    with pytest.raises(ValueError, match="valid presets: quickstart, ci"):
        base.parse_ref("base:qwen2_5_vl@fast")
    with pytest.raises(KeyError, match="qwen2_5_vl"):
        base.parse_ref("base:qwen25")


def test_ci_base_knows_heldout_skills_and_not_targets(ci_base, capsys):
    """`lmm-ray eval --model base:qwen2_5_vl@ci --json`: held-out well above chance, targets near chance."""
    assert cli.main(["eval", "--model", "base:qwen2_5_vl@ci", "--n", "32", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    from lmm_ray import evaluate

    chance = {}
    for s in skills.heldout_skills() + skills.target_skills():
        chance[s] = evaluate._chance(skills.generate(s, 300, seed=1, image_size=32))
    held = [m[f"heldout/{s}/acc"] - chance[s] for s in skills.heldout_skills()]
    assert sum(held) / len(held) > 15, held  # clearly above chance on average
    for s in skills.target_skills():
        assert m[f"target/{s}/acc"] <= chance[s] + 15, (s, m[f"target/{s}/acc"], chance[s])


def test_build_progress_in_a_log_is_a_line_per_tenth(capsys):
    """Not a terminal (a Ray worker's forwarded output, a log file): 10 lines, not one per step."""
    from lmm_ray import base

    bar = base._EveryTenth(95, "base:x@y", True)
    for _ in range(95):
        bar.step(0.5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("base:x@y: 10% (10/95 steps), loss 0.500")
    assert lines[-1].startswith("base:x@y: 100% (95/95 steps)")
    quiet = base._EveryTenth(95, "q", False)
    for _ in range(95):
        quiet.step(0.5)
    assert capsys.readouterr().err == ""
