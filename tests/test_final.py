"""Picking and using a recipe: export -> a search space a sweep accepts unchanged -> `lmm-ray train`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lmm_ray import cli, config, pareto, space

SMOKE = "sweeps/smoke.yaml"


def _overrides(tmp_path, name="final"):
    return [f"storage={tmp_path / 'runs'}", f"name={name}", "stages.0.steps=4", "stages.1.steps=4",
            "train.n_train=32", "eval.n_per_skill=8"]


def _export(tmp_path, recipe="sa_proj", lr=1e-3, **params) -> str:
    row = {"trial_id": "t1", "recipe": recipe, "lr": lr, **{f"param/{k}": v for k, v in params.items()},
           "learning": 1.0, "heldout_change": -1.0, "counting_bias": 0.0, "objective": 0.0}
    path = tmp_path / "choice.yaml"
    pareto.export_recipe(row, path)
    return str(path)


def test_exported_recipe_round_trips_into_a_sweep(tmp_path):
    path = _export(tmp_path, "lora", 3.0e-4, lora_rank=4)
    assert yaml.safe_load(open(path)) == {"recipe": "lora", "lr": 3.0e-4, "lora_rank": 4}
    one = [f"search_space={path}", "search.num_trials=1"]  # smoke.yaml asks for 2 trials: both would be this one
    cfg = config.load_sweep(SMOKE, _overrides(tmp_path) + one)
    assert cfg.search_space.searched == []  # every value fixed
    spec = space.trial_recipe(cfg, cfg.search_space.example())
    assert spec.name == "lora" and spec.lora.rank == 4
    assert cli.main(["validate", SMOKE, *_overrides(tmp_path), *one]) == 0
    assert cli.main(["validate", SMOKE, *_overrides(tmp_path), f"search_space={path}"]) == 2  # 2 identical trials


def test_train_writes_a_model_that_transformers_loads_and_that_scores_as_reported(tmp_path, ci_base, ray_cluster, capsys):
    from transformers import AutoModelForImageTextToText

    from lmm_ray import evaluate, models, train
    from lmm_ray.trial import trial_spec

    recipe = _export(tmp_path, "sa_proj", 2e-3)
    out = tmp_path / "trained"
    # On the session's shared cluster (--address): no Ray start-up of its own.
    assert cli.main(["train", SMOKE, "--choice", recipe, "--output", str(out), *_overrides(tmp_path),
                     "--address", ray_cluster.address]) == 0
    assert "saved the trained model" in capsys.readouterr().out
    import ray

    assert not ray.is_initialized(), "train disconnects from a cluster it connected to"

    model = AutoModelForImageTextToText.from_pretrained(out)
    base = AutoModelForImageTextToText.from_pretrained(ci_base)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed and all(".self_attn." in n and n.startswith("model.language_model.layers.") for n in changed)

    # Score the saved folder on the trial's own evaluation data: it must give what the run reported.
    history = json.loads((out / "lmm_ray_metrics.json").read_text())["history"]
    cfg = config.load_sweep(SMOKE, _overrides(tmp_path) + [f"search_space={recipe}", "search.num_trials=1"])
    spec = trial_spec(cfg, cfg.search_space.example())
    loaded = models.load_model(str(out))
    report = evaluate.evaluate(loaded.model, loaded.processor, train.trial_eval_sets(spec, loaded.processor),
                               batch_size=spec.eval.batch_size, max_new_tokens=spec.eval.max_new_tokens)
    got = report.metrics()
    for k, v in history[-1].items():
        if k.endswith("/acc") or k.endswith("mean_acc"):
            assert got[k] == pytest.approx(v), k

    # The run is in the sweep's MLflow experiment, tagged as the final training, with per-stage metrics.
    from lmm_ray import tracking

    c = tracking.client(cfg.mlflow_uri)
    runs = c.search_runs([c.get_experiment_by_name(cfg.experiment).experiment_id], "tags.`lmm_ray.role` = 'final'")
    assert len(runs) == 1
    assert [m.step for m in c.get_metric_history(runs[0].info.run_id, "heldout/mean_acc")] == [1, 2]


def test_train_refuses_a_recipe_that_still_searches(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("recipe: {choice: [sa_proj, mlp]}\nlr: 1.0e-3\n")
    assert cli.main(["train", SMOKE, "--choice", str(space), "--output", str(tmp_path / "o"), *_overrides(tmp_path)]) == 2
    assert "recipe still vary; a recipe to train must fix every value" in capsys.readouterr().err
