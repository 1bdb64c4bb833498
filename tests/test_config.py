"""Sweep configs: shipped files load, overrides, round trip, trial recipes, and bad input."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import optuna
import pytest
import yaml
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from lmm_ray.config import SweepConfig, apply_overrides, load_sweep, parse_sweep
from lmm_ray.errors import ConfigError
from lmm_ray.schema import TrainConfig
from lmm_ray.space import (
    SearchSpace,
    inactive_params,
    load_search_space,
    parse_search_space,
    trial_recipe,
    trial_train,
)
from lmm_ray.recipes import RECIPES
from lmm_ray.skills import heldout_skills

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))

BASE = {
    "name": "t",
    "model": "tiny:qwen2_5_vl",
    "stages": [{"skill": "count", "steps": 5}, {"skill": "clock", "steps": 5}],
    "heldout": ["color", "shape"],
    "search_space": {"recipe": {"choice": ["sa_proj", "mlp", "lora"]}, "lr": {"loguniform": [1.0e-4, 1.0e-3]}},
}


def parse(overrides=(), mutate=None) -> SweepConfig:
    raw = apply_overrides(BASE, overrides)
    if mutate:
        mutate(raw)
    return parse_sweep(raw, source="test")


# ---------------------------------------------------------------------------------------------
# shipped files


def test_shipped_files_exist():
    names = {p.name for p in SWEEPS}
    assert {"quickstart.yaml", "smoke.yaml"} <= names
    assert {"study_recipes.yaml", "layer_ranges.yaml", "lora.yaml"} <= {p.name for p in SPACES}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweeps_load(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # search_space paths must not depend on the CWD
    cfg = load_sweep(path)
    assert cfg.stages and cfg.heldout
    assert parse_sweep(cfg.to_dict()) == cfg
    if path.stem.startswith("study_"):  # cluster sweeps: shared storage and a tracking server
        assert cfg.sweep_dir.startswith("/mnt/shared/") and cfg.mlflow_uri.startswith("http")
        return
    assert cfg.name == path.stem
    assert cfg.sweep_dir == str(tmp_path / "runs" / cfg.name)
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path}/runs/{cfg.name}/mlflow.db"
    assert cfg.experiment == cfg.name


def test_quickstart_and_smoke_contents():
    q = load_sweep(ROOT / "sweeps/quickstart.yaml")
    assert [s.skill for s in q.stages] == ["clock", "count", "read_word"]
    assert [s.steps for s in q.stages] == [120, 120, 120]
    assert q.heldout_names == heldout_skills()
    assert (q.search.algorithm, q.search.num_trials, q.objective.mode, q.scheduler.type) == ("tpe", 8, "scalar", "none")
    p = load_sweep(ROOT / "sweeps/phenomena.yaml")  # the quickstart's world, a grid for fidelity.py's (c)
    assert [s.skill for s in p.stages] == [s.skill for s in q.stages] and [s.steps for s in p.stages] == [240] * 3
    assert (p.model, p.heldout_names, p.train, p.eval, p.objective) == (q.model, q.heldout_names, q.train, q.eval, q.objective)
    assert (p.search.algorithm, p.search.num_trials) == ("grid", 9)
    assert p.search_space.recipe_names == ["sa_proj", "mlp_gate_up", "full"]
    s = load_sweep(ROOT / "sweeps/smoke.yaml")
    assert s.model == "base:qwen2_5_vl@ci" and len(s.stages) == 2 and len(s.heldout) == 3
    assert (s.search.algorithm, s.search.num_trials, s.eval.n_per_skill) == ("random", 2, 8)


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_spaces_build_tune_and_optuna_domains(path):
    space = load_search_space(path)
    tuned = space.to_tune()
    assert set(tuned) == set(space.names) and {"recipe", "lr"} <= set(tuned)
    kinds = {"choice": tune.search.sample.Categorical, "loguniform": tune.search.sample.Float,
             "uniform": tune.search.sample.Float, "randint": tune.search.sample.Integer}
    for name, dom in space.params.items():
        if dom.kind == "fixed":
            assert tuned[name] == dom.values[0]
        else:
            assert isinstance(tuned[name], kinds[dom.kind]), name
    dists = OptunaSearch.convert_search_space(tuned)  # what OptunaSearch will do with it
    assert set(dists) == set(space.searched)
    assert isinstance(dists["lr"], optuna.distributions.FloatDistribution) and dists["lr"].log
    for r in space.recipe_names:  # every recipe of the space builds with the options' first values
        trial_recipe(space, {**space.example(), "recipe": r})


def test_study_space_has_the_study_recipes():
    space = load_search_space(ROOT / "search_spaces/study_recipes.yaml")
    assert space.recipe_names == ["sa_proj", "sa_qkv", "mlp", "mlp_gate_up", "mlp_down", "llm", "vision", "projector", "full"]
    assert space.params["lr"].kind == "loguniform"


def test_to_tune_randint_is_inclusive_and_grid_for_choice_only_space():
    space = parse_search_space({"recipe": {"choice": ["sa_proj", "mlp"]}, "lr": {"choice": [1.0e-4, "1e-3"]},
                                "batch_size": {"randint": [4, 6]}, "weight_decay": 0.01})
    assert space.params["lr"].values == (1e-4, 1e-3)  # `1e-3` (a string in YAML 1.1) is read as a number
    t = space.to_tune()
    assert (t["batch_size"].lower, t["batch_size"].upper) == (4, 7)  # Tune's upper bound is exclusive
    assert OptunaSearch.convert_search_space(t)["batch_size"].high == 6
    assert space.grid() == {"recipe": ["sa_proj", "mlp"], "lr": [1e-4, 1e-3], "batch_size": [4, 5, 6]}
    assert space.grid_size == 12
    optuna.samplers.GridSampler(space.grid())


def test_exported_recipe_is_a_valid_space(tmp_path):
    path = tmp_path / "best.yaml"
    path.write_text("# exported\nrecipe: sa_proj\nlr: 1.0e-4\nlora_rank: 8\nbatch_size: 8\n")
    space = load_search_space(path)
    assert space.searched == [] and space.fixed() == {"recipe": "sa_proj", "lr": 1e-4, "lora_rank": 8, "batch_size": 8}
    assert space.to_tune() == space.fixed() and space.grid_size == 1
    assert trial_recipe(space, {}) == RECIPES.get("sa_proj")  # lora_rank has no effect on sa_proj
    assert inactive_params(space, {}) == {"lora_rank"}
    cfg = parse(mutate=lambda r: r.update(search_space=str(path)))
    assert cfg.search_space == space


# ---------------------------------------------------------------------------------------------
# overrides, round trip, trial mapping


def test_overrides_nested_index_and_yaml_values(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({**BASE, "search_space": "space.yaml"}))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(BASE["search_space"]))
    cfg = load_sweep(sweep, ["search.num_trials=4", "stages.0.steps=50", "model=tiny:llava",
                             "search_space.lr={loguniform: [1e-5, 1e-3]}", "heldout=[arrow, size]",
                             "objective.lambda=2", "train.gradient_checkpointing=true", "eval.n_per_skill=8"])
    assert cfg.search.num_trials == 4 and cfg.stages[0].steps == 50 and cfg.stages[1].steps == 5
    assert cfg.model == "tiny:llava"
    assert cfg.search_space.params["lr"].values == (1e-5, 1e-3)
    assert cfg.search_space.recipe_names == ["sa_proj", "mlp", "lora"]  # rest of the file kept
    assert cfg.heldout_names == ["arrow", "size"]
    assert cfg.objective.lam == 2.0 and cfg.train.gradient_checkpointing is True and cfg.eval.n_per_skill == 8
    assert apply_overrides(BASE, ["train.batch_size=4"]) != BASE and "train" not in BASE  # input not mutated


@pytest.mark.parametrize("override, field, hint", [
    ("search.num_trials", "overrides", "key=value"),
    ("=4", "overrides", "key=value"),
    ("search.num_trails=4", "search.num_trails", "Did you mean 'num_trials'"),
    ("serach.num_trials=4", "serach", "Did you mean 'search'"),
    ("stages.5.steps=1", "stages.5", "index from 0 to 1"),
    ("stages.0.stepz=1", "stages.0.stepz", "Did you mean 'steps'"),
    ("name.x=1", "name.x", "override the whole value: name=..."),
    ("search_space.lr={loguniform: [1e-4", "search_space.lr", "quote it"),
])
def test_bad_overrides(override, field, hint):
    with pytest.raises(ConfigError) as e:
        apply_overrides(BASE, [override])
    assert e.value.field == field
    assert hint in str(e.value)


def test_load_sweep_override_error_names_file(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError) as e:
        load_sweep(sweep, ["search.algoritm=grid"])
    assert str(sweep) in str(e.value) and e.value.field == "search.algoritm"


def test_round_trip_with_everything(tmp_path):
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("attn_o:\n  roles: [llm.attn.o]\n")
    data = {"hf": "flaviagiammarino/path-vqa", "split": "train", "n": 50}
    cfg = parse(mutate=lambda r: r.update(
        recipes_file=str(recipes),
        stages=[{"skill": "count", "epochs": 0.5},
                {"name": "pathvqa", "data": data, "eval_data": {**data, "split": "test", "n": "random:10"}, "steps": 3}],
        heldout=["color", {"name": "bench", "data": {"llava_json": "x.json", "image_folder": "imgs"}}],
        search_space={"recipe": {"choice": ["attn_o", "mine", "lora"]}, "lr": 1.0e-3, "lora_rank": {"choice": [4, 8]},
                      "lwf_weight": {"uniform": [0.5, 1.0]}, "recipes": {"mine": {"roles": ["llm.mlp.down"]}}},
        scheduler={"type": "asha", "grace_period": 1},
        tracking={"mlflow_uri": "http://localhost:5000", "experiment": "e"},
        storage="s3://bucket/sweeps",
    ))
    assert cfg.sweep_dir == "s3://bucket/sweeps/t" and cfg.mlflow_uri == "http://localhost:5000"
    assert cfg.recipes_file == str(recipes)
    assert Path(cfg.heldout[1].data["llava_json"]).is_absolute()  # workers run elsewhere
    assert cfg.stages[1].data["hf"] == "flaviagiammarino/path-vqa"  # a hub id stays as it is
    d = cfg.to_dict()
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    assert parse_sweep(copy.deepcopy(d)) == cfg
    assert parse_sweep(d).to_dict() == d
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # Ray ships it to trials
    assert trial_recipe(cfg, {"recipe": "mine", "lwf_weight": 0.7}).lwf == {"weight": 0.7, "temperature": 2.0}
    assert trial_recipe(cfg, {"recipe": "attn_o"}).roles == ("llm.attn.o",)


def test_round_trip_changes_when_a_value_changes():
    cfg = parse()
    d = cfg.to_dict()
    d["train"]["batch_size"] = 3
    assert parse_sweep(d) != cfg


def test_grid_defaults_num_trials_to_grid_size():
    cfg = parse(["search.algorithm=grid", "search_space.lr={choice: [1.0e-4, 1.0e-3]}"])
    assert cfg.search.num_trials == 6 and cfg.search_space.grid_size == 6
    assert parse_sweep(cfg.to_dict()) == cfg


def test_trial_recipe_applies_options():
    space = parse_search_space({"recipe": {"choice": ["lora", "sa_proj"]}, "lr": {"loguniform": [1.0e-4, 1.0e-3]},
                                "lora_rank": {"choice": [4, 16]}, "lora_roles": {"choice": ["llm.attn.*,llm.mlp.*"]},
                                "layers": {"choice": ["0-1", "2-3"]}})
    spec = trial_recipe(space, {"recipe": "lora", "lr": 3e-4, "lora_rank": 16, "layers": "2-3",
                                "lora_roles": "llm.attn.*,llm.mlp.*", "training_iteration": 1})
    base = RECIPES.get("lora")
    assert spec.name == "lora" and spec.lora.rank == 16 and base.lora.rank == 8
    assert spec.lora.roles == ("llm.attn.*", "llm.mlp.*") and spec.lora.alpha == base.lora.alpha
    assert spec.layers == "2-3" and spec.wise_ft is None
    wise = parse_search_space({"recipe": "mlp", "lr": 1.0e-3, "wise_ft_alpha": 0.3})
    assert trial_recipe(wise, {}).wise_ft == {"alpha": 0.3}
    with pytest.raises(ConfigError, match="wise_ft interpolates weights and does not combine with lora"):
        parse_search_space({"recipe": "lora", "lr": 1.0e-3, "wise_ft_alpha": 0.3})
    sa = trial_recipe(space, {"recipe": "sa_proj", "lora_rank": 4, "layers": "0-1"})
    assert sa.lora is None and sa.layers == "0-1" and sa.roles == RECIPES.get("sa_proj").roles
    assert inactive_params(space, {"recipe": "sa_proj", "lora_rank": 4}) == {"lora_rank", "lora_roles"}
    # last_n replaces a recipe's own layer limit instead of clashing with it
    ranged = parse_search_space({"recipe": "r", "lr": 1.0e-3, "last_n": 2,
                                 "recipes": {"r": {"roles": ["llm.mlp.up"], "layers": "0-1"}}})
    assert trial_recipe(ranged, {}).last_n == 2 and trial_recipe(ranged, {}).layers is None


def test_trial_train_applies_train_keys():
    t = trial_train(TrainConfig(), {"batch_size": 4, "weight_decay": 0.1, "lr": 1e-3, "recipe": "mlp"})
    assert t.batch_size == 4 and isinstance(t.batch_size, int) and t.weight_decay == 0.1
    assert t.grad_accum == TrainConfig().grad_accum
    assert trial_train(TrainConfig(), {}) == TrainConfig()


def test_config_is_frozen():
    cfg = parse()
    with pytest.raises(AttributeError):
        cfg.name = "x"  # type: ignore[misc]
    assert isinstance(cfg.search_space, SearchSpace)


# ---------------------------------------------------------------------------------------------
# bad input: type, field, and a fix hint


def _set(**kw):
    return lambda r: r.update(kw)


def _del(key):
    return lambda r: r.pop(key)


def _space(**kw):
    return lambda r: r["search_space"].update(kw)


BAD = [
    # (id, overrides, mutate, field, hint)
    ("unknown-top-key", [], _set(serach={}), "serach", "Did you mean 'search'"),
    ("unknown-nested-key", [], _set(train={"batchsize": 4}), "train.batchsize", "Did you mean 'batch_size'"),
    ("wrong-type-str", ["train.batch_size='16'"], None, "train.batch_size", "write an integer"),
    ("bool-is-not-int", ["search.num_trials=true"], None, "search.num_trials", "write an integer"),
    ("float-is-not-int", ["train.batch_size=16.0"], None, "train.batch_size", "write an integer"),
    ("missing-model", [], _del("model"), "model", "add `model: ...`"),
    ("missing-stages", [], _del("stages"), "stages", "add `stages: ...`"),
    ("missing-lr", [], lambda r: r["search_space"].pop("lr"), "search_space.lr", "add `lr: ...`"),
    ("lr-inverted", ["search_space.lr={loguniform: [1.0e-3, 1.0e-4]}"], None, "search_space.lr.loguniform",
     "[0.0001, 0.001]"),
    ("lr-empty", ["search_space.lr={loguniform: [1.0e-4, 1.0e-4]}"], None, "search_space.lr.loguniform", "widen it"),
    ("loguniform-zero", ["search_space.lr={loguniform: [0, 1.0e-3]}"], None, "search_space.lr.loguniform",
     "positive lower bound"),
    ("lr-negative-uniform", ["search_space.lr={uniform: [-1.0, 1.0]}"], None, "search_space.lr.uniform.0", "> 0"),
    ("unknown-domain", ["search_space.lr={log_uniform: [1.0e-4, 1.0e-3]}"], None, "search_space.lr",
     "Did you mean 'loguniform'"),
    ("bare-list-domain", ["search_space.lr=[1.0e-4, 1.0e-3]"], None, "search_space.lr", "{choice: "),
    ("int-param-loguniform", ["search_space.batch_size={loguniform: [4, 32]}"], None,
     "search_space.batch_size.loguniform", "{randint: [lo, hi]}"),
    ("list-in-choice", ["search_space.lora_roles={choice: [[llm.attn.q, llm.attn.v]]}"], None,
     "search_space.lora_roles.choice.0", "\"llm.attn.q,llm.attn.v\""),
    ("unknown-param", [], _space(lora_rnk=4), "search_space.lora_rnk", "Did you mean 'lora_rank'"),
    ("unknown-recipe", ["search_space.recipe={choice: [sa_proj, sa_prj]}"], None, "search_space.recipe.choice.1",
     "Did you mean 'sa_proj'"),
    ("unknown-fixed-recipe", ["search_space.recipe=mpl"], None, "search_space.recipe", "use one of:"),
    ("bad-layers", ["search_space.layers={choice: [\"3-1\"]}"], None, "search_space.layers.choice.0", "'16-27'"),
    ("layers-and-last-n", ["search_space.layers=0-1", "search_space.last_n=2"], None, "search_space.last_n",
     "remove one of them"),
    ("unknown-stage-skill", ["stages.0.skill=cuont"], None, "stages.0.skill", "Did you mean 'count'"),
    ("unknown-heldout-skill", ["heldout=[colour]"], None, "heldout.0", "Did you mean 'color'"),
    ("target-as-heldout", ["heldout=[count]"], None, "heldout.0", "use held-out skills"),
    ("stage-is-heldout", ["stages.0.skill=color"], None, "stages.0.skill", "train on a target skill"),
    ("empty-stages", ["stages=[]"], None, "stages", "list at least one stage"),
    ("stage-skill-and-data", ["stages.0.data={hf: x/y}"], None, "stages.0", "`skill: count`"),
    ("stage-neither-skill-nor-data", [], lambda r: r["stages"][0].pop("skill"), "stages.0", "`skill: count`"),
    ("stage-both-steps-epochs", ["stages.0.epochs=1"], None, "stages.0", "steps: 120"),
    ("stage-no-steps", [], lambda r: r["stages"][0].pop("steps"), "stages.0", "epochs: 1.0"),
    ("non-positive-steps", ["stages.1.steps=0"], None, "stages.1.steps", ">= 1"),
    ("duplicate-stage", ["stages.1.skill=count"], None, "stages.1.name", "count_2"),
    ("data-stage-no-eval", ["stages.1={name: vqa, data: {hf: a/b}, steps: 3}"], None, "stages.1.eval_data",
     "add `eval_data:`"),
    ("bad-data-source", ["stages.1={name: vqa, data: {json: a.json}, eval_data: {hf: a/b}, steps: 3}"], None,
     "stages.1.data", "llava_json"),
    ("bad-sampling", ["stages.1={name: vqa, data: {hf: a/b, n: 'top:5'}, eval_data: {hf: a/b}, steps: 3}"], None,
     "stages.1.data.n", "random:10%"),
    ("empty-heldout", ["heldout=[]"], None, "heldout", "heldout: all"),
    ("asha-multi", ["scheduler.type=asha", "objective.mode=multi"], None, "scheduler.type",
     "use scheduler.type: none or objective.mode: scalar"),
    ("asha-grace-too-long", ["scheduler.type=asha", "scheduler.grace_period=2"], None, "scheduler.grace_period",
     "below 2"),
    ("grid-continuous", ["search.algorithm=grid"], None, "search_space.lr", "{choice: [0.0001, 0.000316, 0.001]}"),
    ("grid-wrong-num-trials", ["search.algorithm=grid", "search.num_trials=5", "search_space.lr=1.0e-3"], None,
     "search.num_trials", "set search.num_trials: 3"),
    ("num-trials-zero", ["search.num_trials=0"], None, "search.num_trials", ">= 1"),
    ("max-concurrent-zero", ["search.max_concurrent=0"], None, "search.max_concurrent", ">= 1"),
    ("space-file-missing", ["search_space=nope/space.yaml"], None, "search_space",
     "relative to the sweep file's folder, then the current directory"),
    ("recipes-file-missing", ["recipes_file=nope/recipes.yaml"], None, "recipes_file", "check the path"),
    ("unknown-algorithm", ["search.algorithm=bayes"], None, "search.algorithm", "use one of: tpe, nsga2, random, grid"),
    ("unknown-scheduler", ["scheduler.type=hyperband"], None, "scheduler.type", "use one of: none, asha"),
    ("unknown-mode", ["objective.mode=pareto"], None, "objective.mode", "use one of: scalar, multi"),
    ("mlflow-relative-sqlite", ["tracking.mlflow_uri=sqlite:///mlflow.db"], None, "tracking.mlflow_uri",
     "sqlite:////"),
    ("mlflow-bare-path", ["tracking.mlflow_uri=mlflow.db"], None, "tracking.mlflow_uri", "sqlite:////"),
    ("mlflow-remote-storage-default", ["storage=s3://b/x"], None, "tracking.mlflow_uri", "http://host:5000"),
    ("negative-lambda", ["objective.lambda=-1"], None, "objective.lambda", ">= 0"),
    ("negative-mu", ["objective.mu=-0.5"], None, "objective.mu", ">= 0"),
    ("bad-precision", ["train.precision=fp16"], None, "train.precision", "use one of: auto, fp32, bf16"),
    ("bad-strategy", ["resources.strategy=deepspeed"], None, "resources.strategy", "use one of: ddp, fsdp"),
    ("unknown-family", ["model=tiny:qwen"], None, "model", "use tiny:<family>"),
    ("unknown-preset", ["model=base:qwen2_5_vl@fast"], None, "model", "base:qwen2_5_vl@ci"),
    ("not-a-model-ref", ["model=qwen2_5_vl"], None, "model", "base:<family>[@preset]"),
    ("bad-name", ["name=my sweep"], None, "name", "my_sweep"),
    ("bad-storage-scheme", ["storage=ftp://x/y"], None, "storage", "s3://"),
]


@pytest.mark.parametrize("overrides, mutate, field, hint", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(overrides, mutate, field, hint):
    with pytest.raises(ConfigError) as e:
        parse(overrides, mutate)
    assert e.value.field == field, str(e.value)
    assert hint in str(e.value), str(e.value)
    assert str(e.value).startswith("test: ")  # names the source


def test_asha_multi_message_explains_why():
    with pytest.raises(ConfigError, match="stopped trials would enter the Pareto front with partial metrics"):
        parse(["scheduler.type=asha", "objective.mode=multi"])


def test_relative_mlflow_uri_message_explains_why():
    with pytest.raises(ConfigError, match="Ray workers run in other directories, so it must be absolute"):
        parse(["tracking.mlflow_uri=sqlite:///mlflow.db"])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sweep keys"):
        load_sweep(p)
    with pytest.raises(ConfigError, match="file not found"):
        load_sweep(tmp_path / "missing.yaml")
