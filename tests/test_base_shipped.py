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
