"""A sweep file validated into one typed, frozen `SweepConfig`.

    cfg = load_sweep("sweeps/quickstart.yaml", ["search.num_trials=4", "stages.0.steps=50"])
    cfg.stages, cfg.heldout, cfg.search_space, cfg.train, ...   # typed sections
    cfg.to_dict()              # fully resolved; parse_sweep(cfg.to_dict()) == cfg

This module owns the sweep's shape: stages, held-out sets and their data sources, the model
reference, storage and tracking, `key=value` overrides, and every check that needs nothing but
the file (value rules live in schema.py, the search space in space.py). Checks that need the
model's configuration, data files, the network or the machine are in validate.py; checks that
need a connected Ray cluster are in cluster.py. Paths are made absolute (Ray workers run in other
directories) and the search space is inlined, so `to_dict()` is a complete record of the sweep.
See docs/sweep_config.md for every field.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from lmm_ray.errors import ConfigError
from lmm_ray.registry import did_you_mean
from lmm_ray.schema import (NAME_RE, DATA_RULES, DataConfig, EVAL_RULES, OBJECTIVE_RULES, RESOURCES_RULES, SCHEDULER_RULES, SEARCH_RULES,
                            TRACKING_RULES, TRAIN_RULES, EvalConfig, ObjectiveConfig, ResourcesConfig, SchedulerConfig,
                            SearchConfig, TrackingConfig, TrainConfig, _OBJ_NAMES, R, check_mapping, check_value, ge, gt,
                            is_uri, join, mask_secrets, read_section, read_yaml, resolve_path, section_dict, tname)
from lmm_ray.space import PARAMS, SearchSpace, check_trials, load_recipes_file, not_a_search_space_file, parse_search_space
from lmm_ray.tasks import EVAL_KEYS, split_source

_URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "az")


# ---------------------------------------------------------------------------------------------
# Stages and held-out skills


@dataclass(frozen=True)
class StageConfig:
    name: str  # metric key: target/<name>/acc
    skill: str | None = None  # a generated target skill ...
    data: dict | None = None  # ... or a loaders.load_samples source
    eval_data: dict | None = None  # evaluation source of a data stage
    steps: int | None = None  # exactly one of steps / epochs
    epochs: float | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class HeldoutConfig:
    name: str
    skill: str | None = None  # a generated held-out skill ...
    data: dict | None = None  # ... or a loaders.load_samples source ...
    lmms_eval: str | None = None  # ... or an lmms-eval task run in-process (lmms_backend.py)

    def to_dict(self) -> dict | str:
        return self.name if self.skill == self.name and self.data is None else \
            {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


STAGE_KEYS = ("name", "skill", "data", "eval_data", "steps", "epochs")
HELDOUT_KEYS = ("name", "skill", "data", "lmms_eval")
_PATH_KEYS = ("llava_json", "dataset_yaml", "image_folder", "path")  # `path`: a benchmark's local copy


def _data_source(d, where: str, base_dir: Path | None) -> dict:
    from lmm_ray.errors import DataError
    from lmm_ray.skills.loaders import SOURCE_FORMS as _SOURCE_FORMS
    from lmm_ray.skills.loaders import SOURCE_OPTIONS as _SOURCE_OPTIONS
    from lmm_ray.skills.loaders import check_source, parse_sampling
    from lmm_ray.skills.schema import ANSWER_TYPES

    if not isinstance(d, dict):
        raise ConfigError(where, f"expected a data source mapping, got {tname(d)}", f"use one of: {_SOURCE_FORMS}")
    kinds = [k for k in _SOURCE_OPTIONS if k in d]
    if len(kinds) != 1:
        raise ConfigError(where, f"needs exactly one of the keys {list(_SOURCE_OPTIONS)}, got {sorted(d)}",
                          f"use one of: {_SOURCE_FORMS}")
    kind = kinds[0]
    check_mapping(d, where, {kind, *_SOURCE_OPTIONS[kind], *EVAL_KEYS})
    _eval_keys(d, where)
    out = copy.deepcopy(d)
    check_value(d[kind], R(str), join(where, kind))
    for key in ("sampling", "n"):
        v = d.get(key)
        if v is None or (key == "n" and isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            continue
        try:
            if not isinstance(v, str):
                raise DataError(f"expected a positive integer or a sampling string, got {v!r}")
            parse_sampling(v)
        except DataError as e:
            raise ConfigError(join(where, key), str(e), "write e.g. 500, 'first:500', 'random:10%' or 'all'") from None
    try:
        check_source(split_source(d)[0])  # seeds, benchmark names: what the loader itself checks without a file
    except DataError as e:
        raise ConfigError(where, str(e), "fix the source as the message says (docs/sweep_config.md lists the keys)") from None
    if d.get("answer_type") is not None and d["answer_type"] not in ANSWER_TYPES:
        raise ConfigError(join(where, "answer_type"), f"{d['answer_type']!r} is not an answer type",
                          f"use one of {', '.join(ANSWER_TYPES)}, or leave it out to infer it")
    for key in _PATH_KEYS:  # workers run elsewhere: local paths must be absolute
        if isinstance(out.get(key), str):
            out[key] = str(resolve_path(out[key], base_dir))
    if kind == "hf":  # a local copy (relative path that exists) is made absolute; a hub id stays
        p = Path(out["hf"]).expanduser()
        if p.is_absolute() or out["hf"].startswith((".", "~")) or (base_dir and (base_dir / p).exists()) or p.exists():
            out["hf"] = str(resolve_path(out["hf"], base_dir))
    return out


def _eval_keys(d: dict, where: str) -> None:
    """A source's evaluation keys (tasks.py): a known metric and aggregation, text prompts, a length."""
    from lmm_ray import metrics

    for key, names in (("metric", metrics.METRICS.names()), ("aggregation", metrics.AGGREGATIONS.names())):
        if d.get(key) is not None:
            check_value(d[key], R(str, choices=names), join(where, key))
    for key in ("pre_prompt", "post_prompt", "context_template"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ConfigError(join(where, key), f"expected text, got {tname(d[key])}", 'quote it, e.g. "\\nAnswer with a single word."')
    if d.get("context_template") is not None and "{context}" not in d["context_template"]:
        raise ConfigError(join(where, "context_template"), "has no {context} placeholder", 'write e.g. "Context: {context}\\n"')
    if d.get("max_new_tokens") is not None:
        check_value(d["max_new_tokens"], R(int, ge(1)), join(where, "max_new_tokens"))


def _stages(raw, heldouts: list[str], heldout_names: list[str], targets: list[str], base_dir) -> tuple[StageConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("stages", f"must be a non-empty list of stages, got {raw!r}",
                          "list at least one stage, e.g. `stages: [{skill: count, steps: 120}]`")
    out = []
    for i, s in enumerate(raw):
        where = f"stages.{i}"
        check_mapping(s, where, STAGE_KEYS, example="{skill: count, steps: 120}")
        if ("skill" in s) == ("data" in s):
            raise ConfigError(where, "needs exactly one of `skill` (a generated target skill) and `data` (a real dataset)",
                              f"write `skill: count` (targets: {', '.join(targets)}) or `name: ..., data: {{...}}, eval_data: {{...}}`")
        if ("steps" in s) == ("epochs" in s):
            raise ConfigError(where, "needs exactly one of `steps` and `epochs`",
                              "write `steps: 120` (optimizer steps) or `epochs: 1.0` (passes over the stage's pool)")
        steps = check_value(s["steps"], R(int, ge(1)), f"{where}.steps") if "steps" in s else None
        epochs = check_value(s["epochs"], R(float, gt(0)), f"{where}.epochs") if "epochs" in s else None
        if "skill" in s:
            skill = check_value(s["skill"], R(str), f"{where}.skill")
            if skill in heldouts:
                raise ConfigError(f"{where}.skill", f"{skill!r} is a held-out skill: training on it would leak the held-out evaluation",
                                  f"train on a target skill instead ({', '.join(targets)})")
            if skill not in targets:
                raise ConfigError(f"{where}.skill", f"unknown target skill {skill!r}.{did_you_mean(skill, targets)}",
                                  f"use one of: {', '.join(targets)}; or give a real dataset with `data:`")
            if "eval_data" in s:
                raise ConfigError(f"{where}.eval_data", "is only for `data:` stages (a generated skill is evaluated on fresh samples)",
                                  "remove eval_data, or replace `skill:` with `data:`")
            name = check_value(s.get("name", skill), R(str), f"{where}.name")
            data = eval_data = None
        else:
            skill = None
            if "name" not in s:
                raise ConfigError(f"{where}.name", "is required for a `data:` stage (it names the stage's metrics)",
                                  "add e.g. `name: pathvqa`")
            name = check_value(s["name"], R(str), f"{where}.name")
            if "eval_data" not in s:
                raise ConfigError(f"{where}.eval_data", "is required for a `data:` stage: its accuracy needs samples it was not trained on",
                                  "add `eval_data:` with a test split, e.g. {hf: ..., split: test, n: 500}")
            data = _data_source(s["data"], f"{where}.data", base_dir)
            eval_data = _data_source(s["eval_data"], f"{where}.eval_data", base_dir)
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}.name", f"{name!r} may only contain letters, digits, '_', '.', '-' (it is a metric key)",
                              "rename the stage")
        if name in heldouts or name in heldout_names:
            raise ConfigError(f"{where}.name", f"{name!r} is also a held-out name (metric keys would clash)", "give the stage another name")
        if any(st.name == name for st in out):
            raise ConfigError(f"{where}.name", f"stage name {name!r} is used twice (metrics are keyed by stage name)",
                              f"give the repeated stage a distinct `name:`, e.g. {name}_2")
        out.append(StageConfig(name, skill, data, eval_data, steps, epochs))
    return tuple(out)


def _heldout(raw, heldouts: list[str], base_dir) -> tuple[HeldoutConfig, ...]:
    from lmm_ray.skills import SKILLS

    if raw == "all":
        return tuple(HeldoutConfig(n, n) for n in heldouts)
    if not isinstance(raw, list):
        raise ConfigError("heldout", f"expected 'all' or a list, got {raw!r}",
                          f"write `heldout: all` or a list of names ({', '.join(heldouts)}) and/or {{name, data}} entries")
    if not raw:
        raise ConfigError("heldout", "is empty: held-out change (forgetting) cannot be measured",
                          "write `heldout: all`, or list at least one held-out skill")
    out = []
    if "all" in raw:
        raise ConfigError(f"heldout.{raw.index('all')}", "'all' inside a list is not a skill",
                          f"write `heldout: all` (no brackets) for every generated held-out skill ({', '.join(heldouts)}), "
                          "or list the ones you want")
    for i, h in enumerate(raw):
        where = f"heldout.{i}"
        if isinstance(h, str):
            h = {"skill": h}
        check_mapping(h, where, HELDOUT_KEYS, example="a skill name, or {name: mybench, data: {...}}")
        if sum(k in h for k in ("skill", "data", "lmms_eval")) != 1:
            raise ConfigError(where, "needs exactly one of `skill` (a generated held-out skill), `data` (a real dataset) "
                              "and `lmms_eval` (an lmms-eval task)",
                              "write a skill name, {name: mybench, data: {benchmark: ai2d, n: 500}} or {name: ai2d, lmms_eval: ai2d}")
        task = None
        if "lmms_eval" in h:
            skill = data = None
            task = check_value(h["lmms_eval"], R(str), f"{where}.lmms_eval")
            name = check_value(h.get("name", task), R(str), f"{where}.name")
        elif "skill" in h:
            skill = check_value(h["skill"], R(str), f"{where}.skill")
            if skill not in heldouts:
                what = "a target skill, not a held-out one" if skill in SKILLS else "an unknown skill"
                raise ConfigError(where, f"{skill!r} is {what}.{did_you_mean(skill, heldouts)}",
                                  f"use held-out skills ({', '.join(heldouts)}), or a {{name, data}} entry for a real dataset")
            name = check_value(h.get("name", skill), R(str), f"{where}.name")
            data = None
        else:
            skill = None
            if "name" not in h:
                raise ConfigError(f"{where}.name", "is required for a `data:` entry", "add e.g. `name: mmmu`")
            name = check_value(h["name"], R(str), f"{where}.name")
            data = _data_source(h["data"], f"{where}.data", base_dir)
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}.name", f"{name!r} may only contain letters, digits, '_', '.', '-'", "rename it")
        if any(x.name == name for x in out):
            raise ConfigError(where, f"held-out name {name!r} is listed twice", "remove the duplicate")
        out.append(HeldoutConfig(name, skill, data, task))
    if all(h.lmms_eval for h in out):
        raise ConfigError("heldout", "every held-out entry is an lmms-eval task: the counting-bias probe reads the "
                          "first answer token of held-out sets lmm_ray loads itself, so it would have nothing to read",
                          "add at least one `skill:` or `data:` entry (e.g. {name: ai2d, data: {benchmark: ai2d, n: 500}})")
    return tuple(out)



# ---------------------------------------------------------------------------------------------
# The sweep


TOP_KEYS = ("name", "model", "recipes_file", "stages", "heldout", "train", "eval", "data", "search_space", "search",
            "scheduler", "objective", "resources", "tracking", "storage")


@dataclass(frozen=True)
class SweepConfig:
    name: str
    model: str
    stages: tuple  # of StageConfig, in training order
    heldout: tuple  # of HeldoutConfig
    search_space: SearchSpace
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    data: DataConfig = DataConfig()
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: str = "runs"  # absolute local path or URI
    recipes_file: str | None = None  # absolute
    # The sweep file's folder (relative paths resolve against it): for messages only, so it is
    # neither compared nor written (to_dict round-trips without it).
    base_dir: str | None = field(default=None, compare=False, repr=False)

    @property
    def sweep_dir(self) -> str:
        """<storage>/<name>: an absolute local path or a URI."""
        return f"{self.storage.rstrip('/')}/{self.name}" if is_uri(self.storage) else os.path.join(self.storage, self.name)

    @property
    def mlflow_uri(self) -> str:
        return self.tracking.mlflow_uri

    @property
    def experiment(self) -> str:
        return self.tracking.experiment

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def heldout_names(self) -> list[str]:
        return [h.name for h in self.heldout]

    def public_dict(self) -> dict:
        """`to_dict()` with credentials masked: what is written to the sweep folder and logged."""
        d = self.to_dict()
        if d["tracking"]["mlflow_uri"]:
            d["tracking"]["mlflow_uri"] = mask_secrets(d["tracking"]["mlflow_uri"])
        return d

    def to_dict(self) -> dict:
        """Fully resolved and YAML/JSON-serialisable; parse_sweep(cfg.to_dict()) == cfg."""
        return copy.deepcopy({
            "name": self.name,
            "model": self.model,
            "recipes_file": self.recipes_file,
            "stages": [s.to_dict() for s in self.stages],
            "heldout": [h.to_dict() for h in self.heldout],
            "train": section_dict(self.train),
            "eval": section_dict(self.eval),
            "data": section_dict(self.data),
            "search_space": self.search_space.to_dict(),
            "search": section_dict(self.search),
            "scheduler": section_dict(self.scheduler),
            "objective": section_dict(self.objective, _OBJ_NAMES),
            "resources": section_dict(self.resources),
            "tracking": section_dict(self.tracking),
            "storage": self.storage,
        })


def _model(v, base_dir: Path | None) -> str:
    from lmm_ray.families import FAMILIES

    v = check_value(v, R(str), "model")
    forms = "tiny:<family>, base:<family>[@preset], a hub id (owner/name) or a local model folder"
    m = re.fullmatch(r"(tiny|base):([^@]*)(?:@(.*))?", v)
    if m:
        kind, fam, preset = m.groups()
        if fam not in FAMILIES:
            raise ConfigError("model", f"unknown model family {fam!r}.{did_you_mean(fam, FAMILIES.names())}",
                              f"use {kind}:<family> with one of: {', '.join(FAMILIES.names())}")
        if preset is not None and (kind == "tiny" or not re.fullmatch(r"\w+", preset)):
            raise ConfigError("model", f"bad preset in {v!r}", "write base:<family>@<preset>, e.g. base:qwen2_5_vl@ci (tiny: takes no preset)")
        presets = _base_presets(fam)
        if preset is not None and presets is not None and preset not in presets:
            raise ConfigError("model", f"unknown base preset {preset!r} for family {fam!r}.{did_you_mean(preset, presets)}",
                              f"use one of: {', '.join(f'base:{fam}@{p}' for p in presets)}")
        return v
    path = Path(v).expanduser()
    if path.is_absolute() or v.startswith((".", "~")) or (base_dir and (base_dir / path).is_dir()) or path.is_dir():
        full = resolve_path(v, base_dir)
        if not full.is_dir():
            tried = [full] if path.is_absolute() else dict.fromkeys(
                (d / path).resolve() for d in (base_dir, Path.cwd()) if d is not None)
            raise ConfigError("model", f"local model folder not found: {v} (looked in {' and '.join(map(str, tried))})",
                              f"give an existing folder (relative paths: the sweep file's folder, then the current "
                              f"directory), or one of: {forms}")
        return str(full)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", v):
        return v  # a hub id
    hint = f" Did you mean 'base:{v}'?" if v in FAMILIES else did_you_mean(v, [f"base:{f}" for f in FAMILIES.names()])
    raise ConfigError("model", f"{v!r} is not a model reference.{hint}", f"use {forms}")


def _base_presets(family: str) -> list[str] | None:
    """The base-model presets a family offers (lmm_ray.base.FAMILY_PRESETS, else PRESETS)."""
    from lmm_ray import base

    per_family = getattr(base, "FAMILY_PRESETS", {})
    presets = per_family.get(family, getattr(base, "PRESETS", None))
    return None if presets is None else list(presets)


def _storage(v) -> str:
    v = check_value(v, R(str), "storage")
    if is_uri(v):
        scheme = v.split("://", 1)[0]
        if scheme == "file":
            return str(Path(v[len("file://"):]).resolve())
        if scheme not in _URI_SCHEMES:
            raise ConfigError("storage", f"unsupported storage scheme {scheme!r}://",
                              f"use a local folder or one of: {', '.join(s + '://' for s in _URI_SCHEMES)}")
        return v
    return str((Path.cwd() / Path(v).expanduser()).resolve())


def _tracking(raw: dict, name: str, storage: str) -> TrackingConfig:
    t = read_section(raw, "tracking", TrackingConfig, TRACKING_RULES)
    uri = t.mlflow_uri
    if uri is None:
        if is_uri(storage):
            raise ConfigError("tracking.mlflow_uri", f"storage is remote ({storage}), so there is no local folder for the default sqlite database",
                              "set tracking.mlflow_uri to a tracking server (http://host:5000) or an absolute sqlite:////path/mlflow.db")
        uri = "sqlite:///" + os.path.join(storage, name, "mlflow.db")
    elif uri.startswith("sqlite:"):
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path.startswith("/"):
            raise ConfigError("tracking.mlflow_uri", f"{uri!r} is relative: Ray workers run in other directories, so it must be absolute",
                              f"write an absolute path with four slashes: sqlite:///{os.path.abspath(path or 'mlflow.db')}")
    elif uri.startswith("file:"):
        if not uri.startswith("file:///"):
            raise ConfigError("tracking.mlflow_uri", f"{uri!r} is relative: Ray workers run in other directories, so it must be absolute",
                              f"write file:///absolute/path (better: sqlite:///{os.path.abspath('mlflow.db')})")
    elif not is_uri(uri) and uri != "databricks":
        raise ConfigError("tracking.mlflow_uri", f"{uri!r} is a relative path or a bare file store: Ray workers run in other directories, so it must be an absolute URI",
                          f"write sqlite:///{os.path.abspath(uri) if not uri.startswith('/') else uri.rstrip('/') + '/mlflow.db'} or http://host:5000")
    return TrackingConfig(uri, t.experiment or name)


def _check_batch_split(train: TrainConfig, space: SearchSpace, resources: ResourcesConfig) -> None:
    """The global batch must split evenly over workers and accumulation steps (else it silently shrinks)."""
    sizes = space.params["batch_size"].grid_values() if "batch_size" in space.params else [train.batch_size]
    accums = space.params["grad_accum"].grid_values() if "grad_accum" in space.params else [train.grad_accum]
    for b in sizes:
        for g in accums:
            if b % (resources.num_workers * g):
                raise ConfigError("train.batch_size", f"batch_size {b} does not split into {resources.num_workers} "
                                  f"worker(s) x grad_accum {g}", "make batch_size a multiple of num_workers x grad_accum")


def parse_sweep(raw: dict, source: str = "<file>", base_dir: str | Path | None = None) -> SweepConfig:
    """A sweep mapping into a validated SweepConfig. Relative paths resolve against `base_dir`
    (the sweep file's folder; load_sweep sets it), then the current directory."""
    try:
        return _parse(raw, Path(base_dir).resolve() if base_dir is not None else None)
    except ConfigError as e:
        e.source = e.source or source
        raise


def _parse(raw, base_dir: Path | None) -> SweepConfig:
    from lmm_ray.skills import heldout_skills, target_skills

    check_mapping(raw, "", TOP_KEYS, required=("name", "model", "stages", "search_space"))
    name = check_value(raw["name"], R(str), "name")
    if name in (".", ".."):
        raise ConfigError("name", f"{name!r} is not a folder name of its own (the sweep would write into its storage "
                          "folder or the one above)", "give the sweep a name, e.g. name: my_sweep")
    if not NAME_RE.fullmatch(name):
        raise ConfigError("name", f"{name!r} may only contain letters, digits, '_', '.', '-' (it names a folder and an experiment)",
                          f"e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}")
    model = _model(raw["model"], base_dir)
    recipes_file = raw.get("recipes_file")
    external = {}
    if recipes_file is not None:
        recipes_file = str(resolve_path(check_value(recipes_file, R(str), "recipes_file"), base_dir))
        external = load_recipes_file(recipes_file, base_dir)
    heldouts = heldout_skills()
    heldout = _heldout(raw.get("heldout", "all"), heldouts, base_dir)
    stages = _stages(raw["stages"], heldouts, [h.name for h in heldout], target_skills(), base_dir)

    space_raw, space_src = raw["search_space"], "<inline>"
    if isinstance(space_raw, str):
        path = resolve_path(space_raw, base_dir)
        if not path.is_file():
            tried = [str(p) for p in ((base_dir / space_raw) if base_dir else None, Path.cwd() / space_raw) if p]
            raise ConfigError("search_space", f"search space file not found: {space_raw} (looked at {', '.join(tried)})",
                              "check the path; it is resolved relative to the sweep file's folder, then the current directory")
        space_raw, space_src = read_yaml(path, "search_space"), str(path)
        if space_raw is None:
            raise ConfigError("search_space", f"the search space file {path} is empty (or only comments)",
                              "write at least `recipe:` and `lr:` in it, e.g. search_spaces/study_recipes.yaml")
    space = parse_search_space(space_raw, "search_space", external, space_src)

    sections = dict(
        train=read_section(raw, "train", TrainConfig, TRAIN_RULES),
        eval=read_section(raw, "eval", EvalConfig, EVAL_RULES),
        data=read_section(raw, "data", DataConfig, DATA_RULES),
        search=read_section(raw, "search", SearchConfig, SEARCH_RULES),
        scheduler=read_section(raw, "scheduler", SchedulerConfig, SCHEDULER_RULES),
        objective=read_section(raw, "objective", ObjectiveConfig, OBJECTIVE_RULES, _OBJ_NAMES),
        resources=read_section(raw, "resources", ResourcesConfig, RESOURCES_RULES),
    )
    if sections["eval"].lmms_include_path:  # workers run elsewhere: absolute
        sections["eval"] = replace(sections["eval"], lmms_include_path=str(resolve_path(sections["eval"].lmms_include_path, base_dir)))
    search, sched, obj = sections["search"], sections["scheduler"], sections["objective"]
    if sched.type == "asha":
        if obj.mode == "multi":
            raise ConfigError("scheduler.type", "asha with objective.mode: multi is wrong: stopped trials would enter the Pareto "
                              "front with partial metrics", "use scheduler.type: none or objective.mode: scalar")
        if sched.grace_period >= len(stages):
            raise ConfigError("scheduler.grace_period", f"{sched.grace_period} leaves ASHA no stage to stop at before the last "
                              f"(the sweep has {len(stages)} stage(s); ASHA counts stages)",
                              f"set scheduler.grace_period below {len(stages)}, or scheduler.type: none")
    if search.algorithm == "grid":
        size = space.grid_size  # raises for continuous dimensions
        given = isinstance(raw.get("search"), dict) and "num_trials" in raw["search"]
        if given and search.num_trials != size:
            dims = " x ".join(f"{k} {len(v)}" for k, v in space.grid().items()) or "all values fixed"
            raise ConfigError("search.num_trials", f"is {search.num_trials} but the grid has {size} points ({dims})",
                              f"set search.num_trials: {size}, or leave it out for grid search")
        sections["search"] = replace(search, num_trials=size)
    else:
        given = isinstance(raw.get("search"), dict) and "num_trials" in raw["search"]
        sections["search"] = check_trials(space, search, given)
    _check_batch_split(sections["train"], space, sections["resources"])
    dc = sections["data"]
    if dc.min_pixels is not None and dc.max_pixels is not None and dc.min_pixels > dc.max_pixels:
        raise ConfigError("data.min_pixels", f"{dc.min_pixels} is above data.max_pixels {dc.max_pixels}",
                          "make min_pixels <= max_pixels (lmms-eval's Qwen2.5-VL values: 200704 and 1605632)")
    storage = _storage(raw.get("storage", "runs"))
    tracking = _tracking(raw, name, storage)
    return SweepConfig(name, model, stages, heldout, space, storage=storage, tracking=tracking,
                       recipes_file=recipes_file, base_dir=str(base_dir) if base_dir else None, **sections)


# ---------------------------------------------------------------------------------------------
# Files and overrides


_SECTION_RULES = {"train": TRAIN_RULES, "eval": EVAL_RULES, "data": DATA_RULES, "search": SEARCH_RULES, "scheduler": SCHEDULER_RULES,
                  "objective": OBJECTIVE_RULES, "resources": RESOURCES_RULES, "tracking": TRACKING_RULES}
_OVERRIDE_KEYS = {
    (): TOP_KEYS,
    ("stages", "*"): STAGE_KEYS,
    ("heldout", "*"): HELDOUT_KEYS,
    ("search_space",): (*PARAMS, "recipes"),
    **{(k,): tuple(r) for k, r in _SECTION_RULES.items()},
}


def apply_overrides(raw: dict, overrides, base_dir: Path | None = None) -> dict:
    """A copy of the raw sweep dict with `key=value` overrides applied (overrides.py)."""
    from lmm_ray import overrides as ov

    return ov.apply(raw, overrides, _OVERRIDE_KEYS, base_dir)


def load_sweep(path: str | Path, overrides=()) -> SweepConfig:
    """Read a sweep YAML, apply `key=value` overrides, validate."""
    path = Path(path)
    try:
        raw = read_yaml(path, "")
        if raw is None:
            raise ConfigError("", "the file is empty (or only comments)",
                              "write a sweep: name, model, stages and search_space at least (start from sweeps/quickstart.yaml)")
        if not isinstance(raw, dict):
            raise ConfigError("", f"should be a mapping of sweep keys, got {tname(raw)}", "start from sweeps/quickstart.yaml")
        not_a_search_space_file(raw, path, TOP_KEYS)
        raw = apply_overrides(raw, overrides, path.parent.resolve())
    except ConfigError as e:
        e.source = str(path)
        raise
    return parse_sweep(raw, source=str(path), base_dir=path.parent)


def dump_sweep(cfg: SweepConfig, path: str | Path) -> Path:
    """Write cfg.to_dict() as YAML (what a sweep saves next to its results)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


__all__ = [
    "SweepConfig", "StageConfig", "HeldoutConfig", "load_sweep", "parse_sweep", "apply_overrides", "dump_sweep",
]
