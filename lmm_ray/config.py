"""Sweep files validated into typed, frozen dataclasses.

    cfg = load_sweep("sweeps/quickstart.yaml", ["search.num_trials=4", "stages.0.steps=50"])
    cfg.search_space.to_tune()                 # ray.tune param_space
    spec = trial_recipe(cfg, sampled)          # the RecipeSpec of one sampled configuration
    train = trial_train(cfg.train, sampled)    # TrainConfig with searched train keys applied
    cfg.to_dict()                              # fully resolved; parse_sweep(cfg.to_dict()) == cfg

Everything that can be checked without a model or Ray is checked here, before anything
expensive starts. A problem raises `ConfigError`, whose `field` is the dotted path of the bad
value (`search_space.lr`) and whose message says what is wrong and how to fix it. Paths are
made absolute (Ray workers run in other directories) and the search space is inlined, so
`to_dict()` is a complete record of the sweep that can be saved next to its results.
See docs/sweep_config.md for every field.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import yaml

from lmm_ray.registry import did_you_mean

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # PyYAML reads `1e-4` as a string
_LAYERS_RE = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "az")


class ConfigError(ValueError):
    """A sweep or search-space value that cannot be used; `field` is its dotted path."""

    def __init__(self, field: str, problem: str, fix: str = "", source: str | None = None):
        self.field, self.problem, self.fix, self.source = field, problem, fix, source
        super().__init__(field, problem, fix, source)

    def __str__(self) -> str:
        where = ": ".join(x for x in (self.source, self.field) if x)
        return f"{where}: {self.problem}" + (f"\n  fix: {self.fix}" if self.fix else "")


def _join(*parts) -> str:
    return ".".join(str(p) for p in parts if p != "")


def _tname(v) -> str:
    return "null" if v is None else type(v).__name__


def _unknown_key(where: str, key, allowed) -> ConfigError:
    hint = did_you_mean(key, allowed).strip()
    return ConfigError(_join(where, key), f"unknown key {key!r}",
                       f"{hint + ' ' if hint else ''}Valid keys here: {', '.join(sorted(map(str, allowed)))}")


def _mapping(d, where: str, allowed, required=(), example: str = "") -> dict:
    if not isinstance(d, dict):
        raise ConfigError(where, f"expected a mapping, got {_tname(d)} ({d!r})",
                          example or f"write it as `key: value` lines; valid keys: {', '.join(sorted(allowed))}")
    for k in d:
        if k not in allowed:
            raise _unknown_key(where, k, allowed)
    for k in required:
        if k not in d:
            raise ConfigError(_join(where, k), "is required but missing", f"add `{k}: ...`" + (f" ({example})" if example else ""))
    return d


# ---------------------------------------------------------------------------------------------
# Typed values: one rule per field, shared by sections and search-space parameters


class Rule(NamedTuple):
    type: type  # int, float, bool or str
    test: Callable[[Any], bool] | None = None
    need: str = ""  # what `test` requires, for the message
    choices: tuple = ()
    nullable: bool = False


def _ge(x):
    return lambda v: v >= x, f">= {x}"


def _gt(x):
    return lambda v: v > x, f"> {x}"


_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
_UNIT_CLOSED = (lambda v: 0 <= v <= 1, "in [0, 1]")


def _layers_ok(v: str) -> bool:
    if not _LAYERS_RE.fullmatch(v):
        return False
    return all(int(a) <= int(b or a) for a, b in re.findall(r"(\d+)(?:-(\d+))?", v))


def R(t: type, check=None, *, choices=(), nullable=False) -> Rule:
    test, need = check or (None, "")
    return Rule(t, test, need, tuple(choices), nullable)


def _value(v, rule: Rule, where: str):
    """v checked (and converted) against a rule; bool is never accepted as a number."""
    if v is None:
        if rule.nullable:
            return None
        raise ConfigError(where, "is null", f"give a {rule.type.__name__} value, or remove the key for its default")
    t = rule.type
    if t is bool:
        if not isinstance(v, bool):
            raise ConfigError(where, f"expected true or false, got {_tname(v)} {v!r}", "write true or false")
    elif t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(where, f"expected a whole number, got {_tname(v)} {v!r}",
                              "write an integer such as 16 (not a string, bool or 16.0)")
    elif t is float:
        if isinstance(v, str) and _FLOAT_RE.fullmatch(v.strip()):
            v = float(v)  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(where, f"expected a number, got {_tname(v)} {v!r}", "write a number such as 0.001 or 1.0e-3")
        v = float(v)
    elif t is str:
        if isinstance(v, int) and not isinstance(v, bool) and rule.test is _layers_ok:
            v = str(v)  # `layers: 3`
        if not isinstance(v, str) or not v:
            raise ConfigError(where, f"expected a non-empty string, got {_tname(v)} {v!r}", "write a string")
    if rule.choices and v not in rule.choices:
        raise ConfigError(where, f"{v!r} is not a valid choice.{did_you_mean(v, rule.choices)}",
                          f"use one of: {', '.join(map(str, rule.choices))}")
    if rule.test is not None and not rule.test(v):
        raise ConfigError(where, f"{v!r} is out of range: must be {rule.need}", f"use a value {rule.need}")
    return v


def _section(raw: dict, key: str, cls, rules: dict[str, Rule], yaml_names: dict[str, str] | None = None):
    """A flat section (train, eval, ...) into its dataclass; missing keys keep their defaults."""
    d = raw.get(key)
    d = {} if d is None else _mapping(d, key, rules)
    names = yaml_names or {}
    kw = {}
    for f in fields(cls):
        yk = names.get(f.name, f.name)
        if yk in d:
            kw[f.name] = _value(d[yk], rules[yk], _join(key, yk))
    return cls(**kw)


def _section_dict(obj, yaml_names: dict[str, str] | None = None) -> dict:
    names = yaml_names or {}
    return {names.get(f.name, f.name): getattr(obj, f.name) for f in fields(obj)}


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # null: no clipping
    n_train: int = 2048  # generated samples per stage pool
    precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    n_per_skill: int = 64
    batch_size: int = 64
    max_new_tokens: int = 8
    image_size: int = 64
    seed: int = 10000


@dataclass(frozen=True)
class SearchConfig:
    algorithm: str = "tpe"
    num_trials: int = 8
    seed: int = 0
    max_concurrent: int = 1
    n_startup_trials: int = 4
    population_size: int = 4


@dataclass(frozen=True)
class SchedulerConfig:
    type: str = "none"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class ObjectiveConfig:
    mode: str = "scalar"
    lam: float = 1.0  # YAML key `lambda`
    mu: float = 100.0


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    strategy: str = "ddp"
    max_failures: int = 1


@dataclass(frozen=True)
class TrackingConfig:
    mlflow_uri: str | None = None  # resolved at parse time (see SweepConfig.mlflow_uri)
    experiment: str | None = None


TRAIN_RULES = {
    "batch_size": R(int, _ge(1)),
    "grad_accum": R(int, _ge(1)),
    "warmup_ratio": R(float, _UNIT),
    "weight_decay": R(float, _ge(0)),
    "max_grad_norm": R(float, _gt(0), nullable=True),
    "n_train": R(int, _ge(1)),
    "precision": R(str, choices=("auto", "fp32", "bf16")),
    "gradient_checkpointing": R(bool),
    "seed": R(int, _ge(0)),
}
EVAL_RULES = {
    "n_per_skill": R(int, _ge(1)),
    "batch_size": R(int, _ge(1)),
    "max_new_tokens": R(int, _ge(1)),
    "image_size": R(int, _ge(8)),
    "seed": R(int, _ge(0)),
}
ALGORITHMS = ("tpe", "nsga2", "random", "grid")
SEARCH_RULES = {
    "algorithm": R(str, choices=ALGORITHMS),
    "num_trials": R(int, _ge(1)),
    "seed": R(int, _ge(0)),
    "max_concurrent": R(int, _ge(1)),
    "n_startup_trials": R(int, _ge(0)),
    "population_size": R(int, _ge(2)),
}
SCHEDULER_RULES = {
    "type": R(str, choices=("none", "asha")),
    "grace_period": R(int, _ge(1)),
    "reduction_factor": R(float, _gt(1)),
}
OBJECTIVE_RULES = {"mode": R(str, choices=("scalar", "multi")), "lambda": R(float, _ge(0)), "mu": R(float, _ge(0))}
RESOURCES_RULES = {
    "num_workers": R(int, _ge(1)),
    "cpus_per_worker": R(float, _gt(0)),
    "gpus_per_worker": R(float, _ge(0)),
    "strategy": R(str, choices=("ddp", "fsdp")),
    "max_failures": R(int, _ge(-1)),
}
TRACKING_RULES = {"mlflow_uri": R(str, nullable=True), "experiment": R(str, nullable=True)}
_OBJ_NAMES = {"lam": "lambda"}


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
    data: dict | None = None  # ... or a loaders.load_samples source

    def to_dict(self) -> dict | str:
        return self.name if self.skill == self.name and self.data is None else \
            {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


STAGE_KEYS = ("name", "skill", "data", "eval_data", "steps", "epochs")
HELDOUT_KEYS = ("name", "skill", "data")
_PATH_KEYS = ("llava_json", "dataset_yaml", "image_folder")


def _resolve_path(p: str, base_dir: Path | None) -> Path:
    """Absolute path: as is if absolute; else relative to the sweep file's folder if it exists there, else the CWD."""
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    if base_dir is not None and (base_dir / path).exists():
        return (base_dir / path).resolve()
    return (Path.cwd() / path).resolve()


def _data_source(d, where: str, base_dir: Path | None) -> dict:
    from lmm_ray.skills.loaders import _SOURCE_FORMS, _SOURCE_OPTIONS, DataError, parse_sampling
    from lmm_ray.skills.schema import ANSWER_TYPES

    if not isinstance(d, dict):
        raise ConfigError(where, f"expected a data source mapping, got {_tname(d)}", f"use one of: {_SOURCE_FORMS}")
    kinds = [k for k in _SOURCE_OPTIONS if k in d]
    if len(kinds) != 1:
        raise ConfigError(where, f"needs exactly one of the keys {list(_SOURCE_OPTIONS)}, got {sorted(d)}",
                          f"use one of: {_SOURCE_FORMS}")
    kind = kinds[0]
    _mapping(d, where, {kind, *_SOURCE_OPTIONS[kind]})
    out = copy.deepcopy(d)
    _value(d[kind], R(str), _join(where, kind))
    for key in ("sampling", "n"):
        v = d.get(key)
        if v is None or (key == "n" and isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            continue
        try:
            if not isinstance(v, str):
                raise DataError(f"expected a positive integer or a sampling string, got {v!r}")
            parse_sampling(v)
        except DataError as e:
            raise ConfigError(_join(where, key), str(e), "write e.g. 500, 'first:500', 'random:10%' or 'all'") from None
    if d.get("answer_type") is not None and d["answer_type"] not in ANSWER_TYPES:
        raise ConfigError(_join(where, "answer_type"), f"{d['answer_type']!r} is not an answer type",
                          f"use one of {', '.join(ANSWER_TYPES)}, or leave it out to infer it")
    for key in _PATH_KEYS:  # workers run elsewhere: local paths must be absolute
        if isinstance(out.get(key), str):
            out[key] = str(_resolve_path(out[key], base_dir))
    if kind == "hf":  # a local copy (relative path that exists) is made absolute; a hub id stays
        p = Path(out["hf"]).expanduser()
        if p.is_absolute() or out["hf"].startswith((".", "~")) or (base_dir and (base_dir / p).exists()) or p.exists():
            out["hf"] = str(_resolve_path(out["hf"], base_dir))
    return out


def _stages(raw, heldouts: list[str], heldout_names: list[str], targets: list[str], base_dir) -> tuple[StageConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("stages", f"must be a non-empty list of stages, got {raw!r}",
                          "list at least one stage, e.g. `stages: [{skill: count, steps: 120}]`")
    out = []
    for i, s in enumerate(raw):
        where = f"stages.{i}"
        _mapping(s, where, STAGE_KEYS, example="{skill: count, steps: 120}")
        if ("skill" in s) == ("data" in s):
            raise ConfigError(where, "needs exactly one of `skill` (a generated target skill) and `data` (a real dataset)",
                              f"write `skill: count` (targets: {', '.join(targets)}) or `name: ..., data: {{...}}, eval_data: {{...}}`")
        if ("steps" in s) == ("epochs" in s):
            raise ConfigError(where, "needs exactly one of `steps` and `epochs`",
                              "write `steps: 120` (optimizer steps) or `epochs: 1.0` (passes over the stage's pool)")
        steps = _value(s["steps"], R(int, _ge(1)), f"{where}.steps") if "steps" in s else None
        epochs = _value(s["epochs"], R(float, _gt(0)), f"{where}.epochs") if "epochs" in s else None
        if "skill" in s:
            skill = _value(s["skill"], R(str), f"{where}.skill")
            if skill in heldouts:
                raise ConfigError(f"{where}.skill", f"{skill!r} is a held-out skill: training on it would leak the held-out evaluation",
                                  f"train on a target skill instead ({', '.join(targets)})")
            if skill not in targets:
                raise ConfigError(f"{where}.skill", f"unknown target skill {skill!r}.{did_you_mean(skill, targets)}",
                                  f"use one of: {', '.join(targets)}; or give a real dataset with `data:`")
            if "eval_data" in s:
                raise ConfigError(f"{where}.eval_data", "is only for `data:` stages (a generated skill is evaluated on fresh samples)",
                                  "remove eval_data, or replace `skill:` with `data:`")
            name = _value(s.get("name", skill), R(str), f"{where}.name")
            data = eval_data = None
        else:
            skill = None
            if "name" not in s:
                raise ConfigError(f"{where}.name", "is required for a `data:` stage (it names the stage's metrics)",
                                  "add e.g. `name: pathvqa`")
            name = _value(s["name"], R(str), f"{where}.name")
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
    for i, h in enumerate(raw):
        where = f"heldout.{i}"
        if isinstance(h, str):
            h = {"skill": h}
        _mapping(h, where, HELDOUT_KEYS, example="a skill name, or {name: mybench, data: {...}}")
        if ("skill" in h) == ("data" in h):
            raise ConfigError(where, "needs exactly one of `skill` (a generated held-out skill) and `data` (a real dataset)",
                              "write a skill name, or {name: mybench, data: {hf: ..., split: test, n: 500}}")
        if "skill" in h:
            skill = _value(h["skill"], R(str), f"{where}.skill")
            if skill not in heldouts:
                what = "a target skill, not a held-out one" if skill in SKILLS else "an unknown skill"
                raise ConfigError(where, f"{skill!r} is {what}.{did_you_mean(skill, heldouts)}",
                                  f"use held-out skills ({', '.join(heldouts)}), or a {{name, data}} entry for a real dataset")
            name = _value(h.get("name", skill), R(str), f"{where}.name")
            data = None
        else:
            skill = None
            if "name" not in h:
                raise ConfigError(f"{where}.name", "is required for a `data:` entry", "add e.g. `name: mmmu`")
            name = _value(h["name"], R(str), f"{where}.name")
            data = _data_source(h["data"], f"{where}.data", base_dir)
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}.name", f"{name!r} may only contain letters, digits, '_', '.', '-'", "rename it")
        if any(x.name == name for x in out):
            raise ConfigError(where, f"held-out name {name!r} is listed twice", "remove the duplicate")
        out.append(HeldoutConfig(name, skill, data))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Search space


PARAMS: dict[str, Rule] = {
    "recipe": R(str),
    "lr": R(float, _gt(0)),
    **{k: TRAIN_RULES[k] for k in ("batch_size", "grad_accum", "weight_decay", "warmup_ratio")},
    "max_grad_norm": R(float, _gt(0)),  # a searched value is a number, never null
    "layers": R(str, (_layers_ok, "a layer range such as '16-27' or '0,2,5'")),
    "last_n": R(int, _ge(1)),
    "lora_rank": R(int, _ge(1)),
    "lora_alpha": R(float, _gt(0)),
    "lora_dropout": R(float, _UNIT),
    "lora_roles": R(str),  # comma-separated role globs: "llm.attn.*,llm.mlp.*"
    "lwf_weight": R(float, _ge(0)),
    "lwf_temperature": R(float, _gt(0)),
    "wise_ft_alpha": R(float, _UNIT_CLOSED),
}
TRAIN_PARAMS = ("batch_size", "grad_accum", "weight_decay", "warmup_ratio", "max_grad_norm")
LORA_PARAMS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_roles")
DOMAINS = ("choice", "loguniform", "uniform", "randint")


@dataclass(frozen=True)
class Domain:
    kind: str  # choice | loguniform | uniform | randint | fixed
    values: tuple  # choice options; (lo, hi) for ranges (randint: both inclusive); (value,) if fixed

    @property
    def continuous(self) -> bool:
        return self.kind in ("loguniform", "uniform")

    def grid_values(self) -> list:
        if self.kind == "randint":
            return list(range(self.values[0], self.values[1] + 1))
        return list(self.values)

    def to_tune(self):
        from ray import tune

        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        return getattr(tune, self.kind)(*self.values)

    def to_yaml(self):
        return self.values[0] if self.kind == "fixed" else {self.kind: list(self.values)}


def _domain(name: str, v, rule: Rule, where: str) -> Domain:
    ex = {"recipe": "{choice: [sa_proj, mlp]}", "lr": "{loguniform: [1.0e-4, 3.0e-3]}"}.get(name, "{choice: [...]}")
    if isinstance(v, list):
        raise ConfigError(where, "a bare list is ambiguous", f"write {{choice: {v}}} to search over these values")
    if not isinstance(v, dict):
        return Domain("fixed", (_value(v, rule, where),))
    if len(v) != 1 or next(iter(v)) not in DOMAINS:
        key = next(iter(v), "")
        raise ConfigError(where, f"expected one domain key of {DOMAINS}, got {sorted(map(str, v))}.{did_you_mean(key, DOMAINS)}",
                          f"write e.g. {ex}, or a plain value to fix it")
    kind, arg = next(iter(v.items()))
    where = f"{where}.{kind}"
    if not isinstance(arg, list) or not arg:
        raise ConfigError(where, f"expected a non-empty list, got {arg!r}", f"write e.g. {ex}")
    if kind == "choice":
        for j, x in enumerate(arg):
            if not isinstance(x, (str, int, float, bool)):
                raise ConfigError(f"{where}.{j}", f"choice values must be str, int, float or bool (Optuna's categorical limit), got {_tname(x)} {x!r}",
                                  "write lists as one string, e.g. lora_roles: \"llm.attn.q,llm.attn.v\"")
        vals = tuple(_value(x, rule, f"{where}.{j}") for j, x in enumerate(arg))
        if len(set(vals)) != len(vals):
            raise ConfigError(where, f"has duplicate values {list(vals)}", "list each value once")
        return Domain("choice", vals)
    if kind in ("loguniform", "uniform") and rule.type is not float or kind == "randint" and rule.type is not int:
        need = "{choice: [...]} or {randint: [lo, hi]}" if rule.type is int else \
            "{loguniform: [lo, hi]} or {uniform: [lo, hi]}" if rule.type is float else "{choice: [...]}"
        raise ConfigError(where, f"{name} is {rule.type.__name__}-valued; {kind} does not fit it", f"use {need}")
    if len(arg) != 2:
        raise ConfigError(where, f"expected [low, high], got {arg!r}", f"write e.g. {ex}")
    lo, hi = (_value(x, Rule(rule.type), f"{where}.{j}") for j, x in enumerate(arg))
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(where, f"log-uniform bounds must be > 0, got low={lo}", "use a positive lower bound such as 1.0e-6")
    if lo == hi and kind != "randint":
        raise ConfigError(where, f"the range [{lo}, {hi}] is empty", f"widen it, or fix the value: `{name}: {lo}`")
    if lo > hi:
        raise ConfigError(where, f"the range is inverted: low={lo} > high={hi}", f"write [low, high]: [{hi}, {lo}]")
    for j, x in enumerate((lo, hi)):
        _value(x, rule, f"{where}.{j}")
    return Domain(kind, (lo, hi))


@dataclass(frozen=True)
class SearchSpace:
    params: dict  # name -> Domain, in file order
    recipes: dict = field(default_factory=dict)  # inline recipe definitions {name: {roles: [...], ...}}
    source: str = field(default="<inline>", compare=False)
    external: dict = field(default_factory=dict, compare=False, repr=False)  # from recipes_file

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def searched(self) -> list[str]:
        """The parameters that vary (not fixed)."""
        return [k for k, d in self.params.items() if d.kind != "fixed"]

    @property
    def recipe_names(self) -> list[str]:
        return self.params["recipe"].grid_values()

    def example(self) -> dict:
        """One valid configuration (first choice, lower bound, fixed value of each parameter)."""
        return {k: d.values[0] for k, d in self.params.items()}

    def fixed(self) -> dict:
        return {k: d.values[0] for k, d in self.params.items() if d.kind == "fixed"}

    def to_tune(self) -> dict:
        """ray.tune param_space: tune.choice / loguniform / uniform / randint, fixed values as is."""
        return {k: d.to_tune() for k, d in self.params.items()}

    def grid(self) -> dict[str, list]:
        """The searched dimensions as lists, for optuna.samplers.GridSampler."""
        for k, d in self.params.items():
            if d.continuous:
                raise ConfigError(f"search_space.{k}", f"is continuous ({d.kind}); a grid needs finite values",
                                  f"write {{choice: {_grid_suggestion(d)}}}")
        return {k: d.grid_values() for k, d in self.params.items() if d.kind != "fixed"}

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def custom_recipes(self) -> dict:
        """name -> RecipeSpec of the recipes_file and inline recipes (pass as `custom=` to recipes.resolve)."""
        from lmm_ray.recipes import RecipeSpec

        return {**self.external, **{n: RecipeSpec.from_dict(n, d) for n, d in self.recipes.items()}}

    def to_dict(self) -> dict:
        out = {k: d.to_yaml() for k, d in self.params.items()}
        if self.recipes:
            out["recipes"] = copy.deepcopy(self.recipes)
        return out


def _grid_suggestion(d: Domain) -> list:
    lo, hi = d.values
    if d.kind == "loguniform":
        return [float(f"{lo * (hi / lo) ** (i / 2):.3g}") for i in range(3)]
    return [float(f"{lo + (hi - lo) * i / 2:.3g}") for i in range(3)]


def parse_search_space(raw, where: str = "search_space", external: dict | None = None, source: str = "<inline>") -> SearchSpace:
    """A search-space mapping (the contents of a search_spaces/*.yaml) into a SearchSpace.
    `external`: name -> RecipeSpec from the sweep's recipes_file."""
    from lmm_ray.recipes import RECIPES, RecipeError, RecipeSpec

    external = dict(external or {})
    _mapping(raw, where, [*PARAMS, "recipes"], required=("recipe", "lr"))
    inline = raw.get("recipes") or {}
    if not isinstance(inline, dict):
        raise ConfigError(f"{where}.recipes", f"expected a mapping of recipe name -> definition, got {_tname(inline)}",
                          "write e.g. `recipes: {my_attn_o: {roles: [llm.attn.o]}}`")
    for n, d in inline.items():
        w = f"{where}.recipes.{n}"
        if not isinstance(n, str) or not NAME_RE.fullmatch(n):
            raise ConfigError(w, f"recipe name {n!r} may only contain letters, digits, '_', '.', '-'", "rename it")
        if n in RECIPES or n in external:
            raise ConfigError(w, f"recipe {n!r} is already defined ({'built in' if n in RECIPES else 'in recipes_file'})",
                              "give the new recipe another name")
        try:
            RecipeSpec.from_dict(n, d)
        except RecipeError as e:
            raise ConfigError(w, str(e), "see lmm_ray/recipes.yaml for the keys a recipe takes") from None
    params = {k: _domain(k, v, PARAMS[k], f"{where}.{k}") for k, v in raw.items() if k != "recipes"}
    space = SearchSpace(params, copy.deepcopy(inline), source, external)
    known = [*RECIPES.names(), *external, *inline]
    for j, r in enumerate(space.recipe_names):
        if r not in known:
            w = f"{where}.recipe" + (f".choice.{j}" if params["recipe"].kind == "choice" else "")
            raise ConfigError(w, f"unknown recipe {r!r}.{did_you_mean(r, known)}",
                              f"use one of: {', '.join(known)} (or define it under `recipes:` or in recipes_file)")
    if "layers" in params and "last_n" in params:
        raise ConfigError(f"{where}.last_n", "`layers` and `last_n` both limit layers; a recipe takes one",
                          "remove one of them")
    customs = space.custom_recipes()
    for r in space.recipe_names:  # every recipe must accept the options (first value of each)
        sample = {**space.example(), "recipe": r}
        try:
            trial_recipe(space, sample, _custom=customs)
        except RecipeError as e:
            raise ConfigError(f"{where}.recipe", f"recipe {r!r} with the searched options fails: {e}",
                              "fix the recipe definition or the option values") from None
    return space


def load_search_space(path: str | Path, recipes_file: str | Path | None = None) -> SearchSpace:
    """A search-space file on its own (e.g. an exported recipe), validated."""
    external = _load_recipes_file(str(recipes_file), None) if recipes_file else {}
    return parse_search_space(_read_yaml(Path(path), "search_space"), external=external, source=str(path))


def trial_recipe(space_or_config, sampled: dict, *, _custom: dict | None = None):
    """The concrete RecipeSpec of one sampled configuration: the base recipe with the sampled
    recipe options applied. LoRA options are ignored for recipes without LoRA (see inactive_params);
    `lwf_*` / `wise_ft_alpha` switch those mitigations on for any recipe."""
    from lmm_ray.recipes import get_recipe

    space = space_or_config.search_space if isinstance(space_or_config, SweepConfig) else space_or_config
    values = {**space.fixed(), **{k: v for k, v in sampled.items() if k in PARAMS}}
    spec = get_recipe(str(values["recipe"]), _custom if _custom is not None else space.custom_recipes())
    opts: dict[str, Any] = {}
    if values.get("layers") is not None:
        spec, opts["layers"] = replace(spec, last_n=None), str(values["layers"])
    if values.get("last_n") is not None:
        spec, opts["last_n"] = replace(spec, layers=None), int(values["last_n"])
    if spec.lora is not None:
        for k in LORA_PARAMS:
            if k in values:
                v = values[k]
                opts[k] = tuple(r.strip() for r in v.split(",")) if k == "lora_roles" else \
                    int(v) if k == "lora_rank" else float(v)
    if "lwf_weight" in values or "lwf_temperature" in values:
        lwf = dict(spec.lwf or {"weight": 1.0, "temperature": 2.0})
        for k in ("weight", "temperature"):
            if f"lwf_{k}" in values:
                lwf[k] = float(values[f"lwf_{k}"])
        opts["lwf"] = lwf
    if "wise_ft_alpha" in values:
        opts["wise_ft"] = {**(spec.wise_ft or {}), "alpha": float(values["wise_ft_alpha"])}
    return spec.with_options(**opts) if opts else spec


def inactive_params(space_or_config, sampled: dict) -> set[str]:
    """Parameters of the space (or sample) that have no effect on this trial: LoRA options of a
    non-LoRA recipe. Log them as missing (NaN) so an exported recipe leaves them out."""
    from lmm_ray.recipes import get_recipe

    space = space_or_config.search_space if isinstance(space_or_config, SweepConfig) else space_or_config
    values = {**space.fixed(), **sampled}
    base = get_recipe(str(values["recipe"]), space.custom_recipes())
    return set() if base.lora is not None else {k for k in LORA_PARAMS if k in values or k in space.params}


def trial_train(train: TrainConfig, sampled: dict) -> TrainConfig:
    """`train` with the searched train keys (batch_size, grad_accum, ...) of a sample applied."""
    kw = {k: PARAMS[k].type(sampled[k]) for k in TRAIN_PARAMS if sampled.get(k) is not None}
    return replace(train, **kw)


# ---------------------------------------------------------------------------------------------
# The sweep


TOP_KEYS = ("name", "model", "recipes_file", "stages", "heldout", "train", "eval", "search_space", "search",
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
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: str = "runs"  # absolute local path or URI
    recipes_file: str | None = None  # absolute

    @property
    def sweep_dir(self) -> str:
        """<storage>/<name>: an absolute local path or a URI."""
        return f"{self.storage.rstrip('/')}/{self.name}" if _is_uri(self.storage) else os.path.join(self.storage, self.name)

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

    def to_dict(self) -> dict:
        """Fully resolved and YAML/JSON-serialisable; parse_sweep(cfg.to_dict()) == cfg."""
        return copy.deepcopy({
            "name": self.name,
            "model": self.model,
            "recipes_file": self.recipes_file,
            "stages": [s.to_dict() for s in self.stages],
            "heldout": [h.to_dict() for h in self.heldout],
            "train": _section_dict(self.train),
            "eval": _section_dict(self.eval),
            "search_space": self.search_space.to_dict(),
            "search": _section_dict(self.search),
            "scheduler": _section_dict(self.scheduler),
            "objective": _section_dict(self.objective, _OBJ_NAMES),
            "resources": _section_dict(self.resources),
            "tracking": _section_dict(self.tracking),
            "storage": self.storage,
        })


def _is_uri(s: str) -> bool:
    return bool(re.match(r"[a-z][a-z0-9+.-]*://", s))


def _read_yaml(path: Path, where: str):
    if not path.is_file():
        raise ConfigError(where, f"file not found: {path}", "check the path (relative paths: the sweep file's folder, then the current directory)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(where, f"{path} is not valid YAML: {e}", "fix the YAML syntax at the position shown") from None


def _load_recipes_file(p: str, base_dir: Path | None) -> dict:
    from lmm_ray.recipes import RECIPES, RecipeError, load_recipe_file

    path = _resolve_path(p, base_dir)
    if not path.is_file():
        raise ConfigError("recipes_file", f"file not found: {path}",
                          "check the path (relative to the sweep file's folder, then the current directory)")
    try:
        custom = load_recipe_file(path)
    except (RecipeError, yaml.YAMLError) as e:
        raise ConfigError("recipes_file", str(e), "see lmm_ray/recipes.yaml for the keys a recipe takes") from None
    for n in custom:
        if n in RECIPES:
            raise ConfigError("recipes_file", f"recipe {n!r} is a built-in recipe's name", f"rename it (e.g. my_{n})")
    return custom


def _model(v, base_dir: Path | None) -> str:
    from lmm_ray.families import FAMILIES

    v = _value(v, R(str), "model")
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
        full = _resolve_path(v, base_dir)
        if not full.is_dir():
            raise ConfigError("model", f"local model folder not found: {full}", f"give an existing folder, or one of: {forms}")
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
    v = _value(v, R(str), "storage")
    if _is_uri(v):
        scheme = v.split("://", 1)[0]
        if scheme == "file":
            return str(Path(v[len("file://"):]).resolve())
        if scheme not in _URI_SCHEMES:
            raise ConfigError("storage", f"unsupported storage scheme {scheme!r}://",
                              f"use a local folder or one of: {', '.join(s + '://' for s in _URI_SCHEMES)}")
        return v
    return str((Path.cwd() / Path(v).expanduser()).resolve())


def _tracking(raw: dict, name: str, storage: str) -> TrackingConfig:
    t = _section(raw, "tracking", TrackingConfig, TRACKING_RULES)
    uri = t.mlflow_uri
    if uri is None:
        if _is_uri(storage):
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
    elif not _is_uri(uri) and uri != "databricks":
        raise ConfigError("tracking.mlflow_uri", f"{uri!r} is a relative path or a bare file store: Ray workers run in other directories, so it must be an absolute URI",
                          f"write sqlite:///{os.path.abspath(uri) if not uri.startswith('/') else uri.rstrip('/') + '/mlflow.db'} or http://host:5000")
    return TrackingConfig(uri, t.experiment or name)


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

    _mapping(raw, "", TOP_KEYS, required=("name", "model", "stages", "search_space"))
    name = _value(raw["name"], R(str), "name")
    if not NAME_RE.fullmatch(name):
        raise ConfigError("name", f"{name!r} may only contain letters, digits, '_', '.', '-' (it names a folder and an experiment)",
                          f"e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}")
    model = _model(raw["model"], base_dir)
    recipes_file = raw.get("recipes_file")
    external = {}
    if recipes_file is not None:
        recipes_file = str(_resolve_path(_value(recipes_file, R(str), "recipes_file"), base_dir))
        external = _load_recipes_file(recipes_file, base_dir)
    heldouts = heldout_skills()
    heldout = _heldout(raw.get("heldout", "all"), heldouts, base_dir)
    stages = _stages(raw["stages"], heldouts, [h.name for h in heldout], target_skills(), base_dir)

    space_raw, space_src = raw["search_space"], "<inline>"
    if isinstance(space_raw, str):
        path = _resolve_path(space_raw, base_dir)
        if not path.is_file():
            tried = [str(p) for p in ((base_dir / space_raw) if base_dir else None, Path.cwd() / space_raw) if p]
            raise ConfigError("search_space", f"search space file not found: {space_raw} (looked at {', '.join(tried)})",
                              "check the path; it is resolved relative to the sweep file's folder, then the current directory")
        space_raw, space_src = _read_yaml(path, "search_space"), str(path)
    space = parse_search_space(space_raw, "search_space", external, space_src)

    sections = dict(
        train=_section(raw, "train", TrainConfig, TRAIN_RULES),
        eval=_section(raw, "eval", EvalConfig, EVAL_RULES),
        search=_section(raw, "search", SearchConfig, SEARCH_RULES),
        scheduler=_section(raw, "scheduler", SchedulerConfig, SCHEDULER_RULES),
        objective=_section(raw, "objective", ObjectiveConfig, OBJECTIVE_RULES, _OBJ_NAMES),
        resources=_section(raw, "resources", ResourcesConfig, RESOURCES_RULES),
    )
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
    storage = _storage(raw.get("storage", "runs"))
    tracking = _tracking(raw, name, storage)
    return SweepConfig(name, model, stages, heldout, space, storage=storage, tracking=tracking,
                       recipes_file=recipes_file, **sections)


# ---------------------------------------------------------------------------------------------
# Files and overrides


_SECTION_RULES = {"train": TRAIN_RULES, "eval": EVAL_RULES, "search": SEARCH_RULES, "scheduler": SCHEDULER_RULES,
                  "objective": OBJECTIVE_RULES, "resources": RESOURCES_RULES, "tracking": TRACKING_RULES}
_OVERRIDE_KEYS = {
    (): TOP_KEYS,
    ("stages", "*"): STAGE_KEYS,
    ("heldout", "*"): HELDOUT_KEYS,
    ("search_space",): (*PARAMS, "recipes"),
    **{(k,): tuple(r) for k, r in _SECTION_RULES.items()},
}


def apply_overrides(raw: dict, overrides, base_dir: Path | None = None) -> dict:
    """A copy of the raw sweep dict with `key=value` overrides applied (dotted paths, list
    indices, values parsed as YAML). A search_space given as a file is inlined when overridden."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, eq, value_text = str(text).partition("=")
        key = key.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", key):
            raise ConfigError("overrides", f"bad override {text!r}",
                              "write key=value with a dotted key, e.g. search.num_trials=4 or stages.0.steps=50")
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(key, f"override value {value_text!r} is not valid YAML ({e.problem})",
                              "quote it or fix the YAML, e.g. key='{loguniform: [1.0e-4, 1.0e-3]}'") from None
        _set(raw, key.split("."), value, base_dir)
    return raw


def _set(raw: dict, parts: list[str], value, base_dir):
    node, trail = raw, []
    for i, part in enumerate(parts):
        here = ".".join([*trail, part])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(here, f"unknown override path: {'.'.join(trail)} has {len(node)} entries",
                                  f"use an index from 0 to {len(node) - 1}")
            key = int(part)
        elif isinstance(node, dict):
            generic = tuple("*" if t.isdigit() else t for t in trail)
            allowed = _OVERRIDE_KEYS.get(generic)
            if allowed is not None and part not in allowed:
                hint = did_you_mean(part, allowed).strip()
                raise ConfigError(here, f"unknown override path {'.'.join(parts)!r}",
                                  f"{hint + ' ' if hint else ''}Valid keys under {'.'.join(trail) or 'the top level'}: {', '.join(allowed)}")
            key = part
        else:
            raise ConfigError(here, f"cannot set {'.'.join(parts)!r}: {'.'.join(trail)} is {_tname(node)} {node!r}, not a mapping or list",
                              f"override the whole value: {'.'.join(trail)}=...")
        if i == len(parts) - 1:
            node[key] = value
            return
        child = node.get(key) if isinstance(node, dict) else node[key]
        if child is None:
            child = node[key] = {}
        elif trail == [] and key == "search_space" and isinstance(child, str):
            path = _resolve_path(child, base_dir)
            child = node[key] = _read_yaml(path, "search_space")
        node, trail = child, [*trail, part]


def load_sweep(path: str | Path, overrides=()) -> SweepConfig:
    """Read a sweep YAML, apply `key=value` overrides, validate."""
    path = Path(path)
    try:
        raw = _read_yaml(path, "")
        if not isinstance(raw, dict):
            raise ConfigError("", f"should be a mapping of sweep keys, got {_tname(raw)}", "start from sweeps/quickstart.yaml")
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
    "ConfigError", "SweepConfig", "StageConfig", "HeldoutConfig", "TrainConfig", "EvalConfig", "SearchConfig",
    "SchedulerConfig", "ObjectiveConfig", "ResourcesConfig", "TrackingConfig", "SearchSpace", "Domain", "PARAMS",
    "load_sweep", "parse_sweep", "apply_overrides", "dump_sweep", "parse_search_space", "load_search_space",
    "trial_recipe", "trial_train", "inactive_params",
]
