"""The shipped quickstart base (lmm_ray/bases): current with the code, intact, used without training."""

from __future__ import annotations

import hashlib
import json
import time

from lmm_ray import base

FAMILY, PRESET = "qwen2_5_vl", "quickstart"


def test_shipped_key_is_the_current_key():
    # A change to the generators, the tokenizer, the preset or BASE_VERSION changes key(): the
    # shipped weights then no longer come from this code, and CI says how to refresh them.
    man = json.loads((base.shipped(FAMILY, PRESET) / base.MANIFEST).read_text())
    current = base._plain(base.key(FAMILY, PRESET))
    diff = sorted(k for k in set(current) | set(man["key"]) if current.get(k) != man["key"].get(k))
    assert not diff, (f"the shipped base:{FAMILY}@{PRESET} was built from other code (differs in {diff}); "
                      f"reship it with: {base.RESHIP.format(preset=PRESET)}")
    assert base.shipped_problem(FAMILY, PRESET) is None


def test_shipped_files_match_their_sha256():
    path = base.shipped(FAMILY, PRESET)
    files = json.loads((path / base.MANIFEST).read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "processor_config.json", base.INFO} <= set(files)
    for name, digest in files.items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest, name
    assert sorted(p.name for p in path.iterdir()) == sorted([*files, base.MANIFEST]), "a file not in the manifest"


def test_ensure_uses_the_shipped_copy_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("LMM_RAY_CACHE", str(tmp_path))

    def no_build(*a, **k):
        raise AssertionError("ensure() trained a base although a current one is shipped")

    monkeypatch.setattr(base, "build", no_build)
    t0 = time.perf_counter()
    path = base.ensure(f"base:{FAMILY}@{PRESET}", quiet=True)
    assert time.perf_counter() - t0 < 10
    assert path.parent == tmp_path / "base" and base.verify(path) is None
    assert (path / "model.safetensors").read_bytes() == (base.shipped(FAMILY, PRESET) / "model.safetensors").read_bytes()


def test_a_stale_shipped_copy_is_not_used_and_the_reason_is_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMM_RAY_CACHE", str(tmp_path))
    real_key = base.key
    monkeypatch.setattr(base, "key", lambda f, p: {**real_key(f, p), "source": "changed"})
    built = []
    monkeypatch.setattr(base, "build", lambda family, preset, path, progress=True: built.append(path))
    path = base.ensure(f"base:{FAMILY}@{PRESET}")
    assert built == [path], "a stale shipped copy must be rebuilt, not used"
    err = capsys.readouterr().err
    assert "not using the shipped base" in err and "source" in err and "make base-ship" in err


def test_ship_then_rebuild_matches_and_a_changed_file_is_named(tmp_path, monkeypatch):
    # A seconds-long preset: ship() copies the cached build with its key; rebuild() builds again in a
    # temporary folder and compares SHA-256s (bit-exact on this machine), naming any file that differs.
    from lmm_ray.families import TinySize

    monkeypatch.setenv("LMM_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(base, "SHIPPED_ROOT", tmp_path / "bases")
    monkeypatch.setitem(base.PRESETS, "unit", base.Preset(
        TinySize(hidden=32, layers=1, intermediate=64, vision_hidden=32, vision_layers=1),
        steps=3, batch_size=4, lr=1e-3, n_per_skill=4, eval_n=2))
    ref = f"base:{FAMILY}@unit"
    dst = base.ship(ref)
    assert dst == tmp_path / "bases" / f"{FAMILY}-unit" and base.shipped_problem(FAMILY, "unit") is None
    ok, lines = base.rebuild(ref)
    assert ok, lines
    assert sum(line.startswith("match") for line in lines) == len(json.loads((dst / base.MANIFEST).read_text())["files"])

    # Shipped weights that this code does not produce (another machine's build, older code):
    man = json.loads((dst / base.MANIFEST).read_text())
    man["files"]["model.safetensors"] = "0" * 64
    (dst / base.MANIFEST).write_text(json.dumps(man))
    ok, lines = base.rebuild(ref)
    assert not ok and [line.split()[1] for line in lines if line.startswith("MISMATCH")] == ["model.safetensors"]
    # A shipped file edited after shipping: not used (ensure would build instead).
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "note": "edited"}))
    assert "damaged" in base.shipped_problem(FAMILY, "unit")
