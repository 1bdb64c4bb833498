"""Bad sweeps fail through the CLI with exit code 2 and a message naming the field and the fix,
before Ray starts (no Ray here: `ray.init` is patched to fail the test if anything calls it).

Each case runs through `lmm-ray validate` and `lmm-ray sweep`: the sweep verb must refuse the
same inputs, in seconds, without booking a cluster.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from lmm_ray import cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
SPACE = ROOT / "search_spaces" / "study_recipes.yaml"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Fail the test if anything starts Ray. (A Ray that another test module's session fixture left
    running may be up already; what matters is that this test did not start one.)"""
    import ray

    def refuse(*a, **k):
        raise AssertionError("ray.init was called: validation must fail before Ray starts")

    was_up = ray.is_initialized()
    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert ray.is_initialized() == was_up


def run_cli(capsys, verb: str, sweep_file, *overrides: str) -> tuple[int, str, str, float]:
    t0 = time.time()
    rc = cli.main([verb, str(sweep_file), *overrides])
    out, err = capsys.readouterr()
    return rc, out, err, time.time() - t0


def _write(tmp_path: Path, mutate) -> Path:
    """smoke.yaml with an absolute search_space path, changed by `mutate(raw)`, written to tmp."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["search_space"] = str(SPACE)
    raw["storage"] = str(tmp_path / "runs")
    mutate(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


# (id, overrides, text that must appear in the message: the field, then words of the fix)
OVERRIDE_CASES = [
    ("unknown-key-did-you-mean", ["search.num_trails=3"], ["search.num_trails", "Did you mean 'num_trials'?"]),
    ("wrong-type", ["search.num_trials=abc"], ["search.num_trials", "expected a whole number", "write an integer"]),
    ("wrong-type-float", ["train.batch_size=1.5"], ["train.batch_size", "expected a whole number"]),
    ("empty-lr-range", ["search_space.lr={loguniform: [1.0e-3, 1.0e-3]}"], ["search_space.lr.loguniform", "is empty", "widen it"]),
    ("inverted-lr-range", ["search_space.lr={loguniform: [1.0e-2, 1.0e-4]}"],
     ["search_space.lr.loguniform", "inverted", "[0.0001, 0.01]"]),
    ("unknown-recipe", ["search_space.recipe={choice: [sa_proj, sa_prj]}"],
     ["search_space.recipe.choice.1", "unknown recipe 'sa_prj'", "Did you mean 'sa_proj'?", "use one of"]),
    ("unknown-stage-skill", ["stages.0.skill=countt"], ["stages.0.skill", "unknown target skill", "Did you mean 'count'?"]),
    ("unknown-heldout-skill", ["heldout=[colour]"], ["heldout.0", "Did you mean 'color'?", "use held-out skills"]),
    ("heldout-skill-as-stage", ["stages.0.skill=color"], ["stages.0.skill", "held-out skill", "train on a target skill"]),
    ("empty-stage-list", ["stages=[]"], ["stages", "non-empty list", "list at least one stage"]),
    ("asha-with-multi", ["scheduler.type=asha", "objective.mode=multi"],
     ["scheduler.type", "asha with objective.mode: multi", "use scheduler.type: none or objective.mode: scalar"]),
    ("asha-grace-too-long", ["scheduler.type=asha", "scheduler.grace_period=2"], ["scheduler.grace_period", "set scheduler.grace_period below 2"]),
    ("uneven-batch", ["train.batch_size=6", "train.grad_accum=4"], ["train.batch_size", "does not split", "multiple of num_workers x grad_accum"]),
    ("too-many-workers", ["resources.num_workers=64", "train.batch_size=64"], ["resources.num_workers", "64 workers", "lower resources.num_workers"]),
    ("gpu-on-cpu-box", ["resources.gpus_per_worker=1"], ["resources.gpus_per_worker", "this machine has 0", "gpus_per_worker: 0"]),
    ("unreachable-mlflow", ["tracking.mlflow_uri=http://127.0.0.1:9"], ["tracking.mlflow_uri", "unreachable", "start the server"]),
    ("layers-outside-model", ["search_space.recipe=sa_proj", "search_space.layers=3-9"],
     ["search_space", "layers=3-9", "outside the model", "4 LLM layers", "fix:"]),
    ("missing-data-file", ["stages.0={name: mine, data: {llava_json: /nonexistent/train.json, image_folder: /tmp}, "
                           "eval_data: {llava_json: /nonexistent/test.json, image_folder: /tmp}, steps: 5}"],
     ["stages.0.data.llava_json", "/nonexistent/train.json does not exist", "fix the path"]),
    ("bad-override-syntax", ["search.num_trials"], ["overrides", "bad override 'search.num_trials'", "key=value"]),
    ("bad-override-yaml", ["search_space.lr={loguniform: [1.0e-3"], ["search_space.lr", "not valid YAML", "quote it"]),
    ("relative-sqlite", ["tracking.mlflow_uri=sqlite:///mlflow.db"], ["tracking.mlflow_uri", "is relative", "sqlite:////"]),
    ("grid-wrong-num-trials", ["search.algorithm=grid", "search_space.lr={choice: [1.0e-3, 1.0e-2]}", "search.num_trials=5"],
     ["search.num_trials", "grid has 18 points", "set search.num_trials: 18"]),
    ("grid-continuous-lr", ["search.algorithm=grid"], ["search_space.lr", "continuous", "choice"]),
    ("unknown-model-family", ["model=base:qwen25_vl@ci"], ["model", "unknown model family", "Did you mean 'qwen2_5_vl'?"]),
]


@pytest.mark.parametrize("verb", ["validate", "sweep"])
@pytest.mark.parametrize("overrides,expect", [c[1:] for c in OVERRIDE_CASES], ids=[c[0] for c in OVERRIDE_CASES])
def test_bad_input_exits_2_before_ray(capsys, tmp_path, verb, overrides, expect):
    rc, out, err, seconds = run_cli(capsys, verb, SMOKE, f"storage={tmp_path}", "name=bad", *overrides)
    assert rc == 2, (out, err)
    assert err.startswith(f"lmm-ray {verb}: error: "), err
    assert "Traceback" not in err
    for text in expect:
        assert text in err, f"{text!r} not in:\n{err}"
    assert "fix:" in err or "Did you mean" in err, err  # every message says how to fix it
    assert seconds < 30, f"{verb} took {seconds:.1f} s to refuse a bad sweep"
    assert not (tmp_path / "bad" / "tune").exists()  # nothing of a sweep was started


def test_unknown_top_level_key_in_file(capsys, tmp_path):
    path = _write(tmp_path, lambda raw: raw.update(serch=raw.pop("search")))
    for verb in ("validate", "sweep"):
        rc, _, err, _ = run_cli(capsys, verb, path)
        assert rc == 2
        assert f"{path}: serch: unknown key 'serch'" in err, err
        assert "Did you mean 'search'?" in err


def test_unknown_key_in_section_of_file(capsys, tmp_path):
    path = _write(tmp_path, lambda raw: raw["train"].update(bacth_size=raw["train"].pop("batch_size")))
    rc, _, err, _ = run_cli(capsys, "validate", path)
    assert rc == 2
    assert "train.bacth_size: unknown key 'bacth_size'" in err and "Did you mean 'batch_size'?" in err, err


def test_missing_search_space_file(capsys, tmp_path):
    path = _write(tmp_path, lambda raw: raw.update(search_space="nowhere/space.yaml"))
    rc, _, err, _ = run_cli(capsys, "sweep", path)
    assert rc == 2
    assert "search_space: search space file not found: nowhere/space.yaml" in err and "fix:" in err, err


def test_missing_sweep_file(capsys, tmp_path):
    rc, _, err, _ = run_cli(capsys, "validate", tmp_path / "nope.yaml")
    assert rc == 2
    assert "file not found" in err and "nope.yaml" in err


def test_unreachable_mlflow_is_refused_fast(capsys, tmp_path):
    """Nothing listens on port 9: connection refused must come back at once, not after a timeout."""
    from lmm_ray import config, tracking

    cfg = config.load_sweep(SMOKE, [f"storage={tmp_path}", "tracking.mlflow_uri=http://127.0.0.1:9"])
    t0 = time.time()
    with pytest.raises(ConnectionError, match="unreachable"):
        tracking.check_reachable(cfg.mlflow_uri)
    assert time.time() - t0 < 2


def test_resume_of_a_missing_sweep_exits_2(capsys, tmp_path):
    rc, _, err, _ = run_cli(capsys, "sweep", SMOKE, f"storage={tmp_path}", "name=never_ran", "--resume")
    assert rc == 2
    assert "--resume: no sweep to resume" in err and "without --resume" in err, err
    assert not (tmp_path / "never_ran" / "tune").exists()


def test_fresh_sweep_on_an_existing_name_exits_2(capsys, tmp_path):
    (tmp_path / "taken" / "tune").mkdir(parents=True)  # what a started sweep leaves behind
    rc, _, err, _ = run_cli(capsys, "sweep", SMOKE, f"storage={tmp_path}", "name=taken")
    assert rc == 2
    assert "sweep 'taken' already exists" in err and "--resume" in err and "name=" in err, err


def test_validate_quickstart_prints_the_plan(capsys):
    rc, out, err, _ = run_cli(capsys, "validate", ROOT / "sweeps" / "quickstart.yaml")
    assert rc == 0, err
    for text in ("sweep      quickstart", "model      base:qwen2_5_vl (qwen2_5_vl)",
                 "clock (120 steps) -> count (120 steps) -> read_word (120 steps)", "search     tpe, 8 trials",
                 "sa_proj (", "trainable)", "objective  scalar", "mlflow     sqlite:///"):
        assert text in out, f"{text!r} not in the plan:\n{out}"
    assert out.rstrip().endswith("valid")


def test_validate_smoke_offline(capsys, tmp_path):
    rc, out, err, _ = run_cli(capsys, "validate", SMOKE, f"storage={tmp_path}", "--offline")
    assert rc == 0, err
    assert "valid (offline" in out
