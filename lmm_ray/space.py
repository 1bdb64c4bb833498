"""The search space: what Optuna may vary, how it becomes a Ray Tune param_space, and what a
sampled point means as a recipe.

    space = parse_search_space(yaml.safe_load(open("search_spaces/study.yaml")))
    space.to_tune()                          # ray.tune param_space
    recipe = trial_recipe(space, sampled)    # the RecipeSpec of one sampled configuration
    train = trial_train(train_cfg, sampled)  # TrainConfig with searched train keys applied

A parameter is fixed (a plain value) or a domain: `{choice: [...]}`, `{loguniform: [lo, hi]}`,
`{uniform: [lo, hi]}`, `{randint: [lo, hi]}` (both ends inclusive). Every value is checked by the
same rules as the sweep file's sections (schema.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmm_ray.errors import ConfigError, RecipeError
from lmm_ray.registry import did_you_mean
from lmm_ray.schema import (NAME_RE, TRAIN_RULES, UNIT, UNIT_CLOSED, R, Rule, TrainConfig, ge, gt, layers_ok, check_mapping,
                            read_yaml, resolve_path, tname, check_value)

PARAMS: dict[str, Rule] = {
    "recipe": R(str),
    "lr": R(float, gt(0)),
    **{k: TRAIN_RULES[k] for k in ("batch_size", "grad_accum", "weight_decay", "warmup_ratio")},
    "max_grad_norm": R(float, gt(0)),  # a searched value is a number, never null
    "layers": R(str, (layers_ok, "a layer range such as '16-27' or '0,2,5'")),
    "last_n": R(int, ge(1)),
    "lora_rank": R(int, ge(1)),
    "lora_alpha": R(float, gt(0)),
    "lora_dropout": R(float, UNIT),
    "lora_roles": R(str),  # comma-separated role globs: "llm.attn.*,llm.mlp.*"
    "lwf_weight": R(float, ge(0)),
    "lwf_temperature": R(float, gt(0)),
    "wise_ft_alpha": R(float, UNIT_CLOSED),
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
        return Domain("fixed", (check_value(v, rule, where),))
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
                raise ConfigError(f"{where}.{j}", f"choice values must be str, int, float or bool (Optuna's categorical limit), got {tname(x)} {x!r}",
                                  "write lists as one string, e.g. lora_roles: \"llm.attn.q,llm.attn.v\"")
        vals = tuple(check_value(x, rule, f"{where}.{j}") for j, x in enumerate(arg))
        if len(set(vals)) != len(vals):
            raise ConfigError(where, f"has duplicate values {list(vals)}", "list each value once")
        return Domain("choice", vals)
    if kind in ("loguniform", "uniform") and rule.type is not float or kind == "randint" and rule.type is not int:
        need = "{choice: [...]} or {randint: [lo, hi]}" if rule.type is int else \
            "{loguniform: [lo, hi]} or {uniform: [lo, hi]}" if rule.type is float else "{choice: [...]}"
        raise ConfigError(where, f"{name} is {rule.type.__name__}-valued; {kind} does not fit it", f"use {need}")
    if len(arg) != 2:
        raise ConfigError(where, f"expected [low, high], got {arg!r}", f"write e.g. {ex}")
    lo, hi = (check_value(x, Rule(rule.type), f"{where}.{j}") for j, x in enumerate(arg))
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(where, f"log-uniform bounds must be > 0, got low={lo}", "use a positive lower bound such as 1.0e-6")
    if lo == hi and kind != "randint":
        raise ConfigError(where, f"the range [{lo}, {hi}] is empty", f"widen it, or fix the value: `{name}: {lo}`")
    if lo > hi:
        raise ConfigError(where, f"the range is inverted: low={lo} > high={hi}", f"write [low, high]: [{hi}, {lo}]")
    for j, x in enumerate((lo, hi)):
        check_value(x, rule, f"{where}.{j}")
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

    @property
    def distinct(self) -> float:
        """How many different configurations the space holds (math.inf with a continuous range)."""
        if any(d.continuous for d in self.params.values()):
            return math.inf
        return math.prod(len(d.grid_values()) for d in self.params.values())

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
    from lmm_ray.recipes import RECIPES, RecipeSpec

    external = dict(external or {})
    check_mapping(raw, where, [*PARAMS, "recipes"], required=("recipe", "lr"))
    inline = raw.get("recipes") or {}
    if not isinstance(inline, dict):
        raise ConfigError(f"{where}.recipes", f"expected a mapping of recipe name -> definition, got {tname(inline)}",
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


def check_trials(space: SearchSpace, search, given: bool):
    """More trials than the space has configurations would repeat one: a trial's seed is
    train.seed, so a repeat costs a full trial and gives the same result. Left out, num_trials is
    therefore capped at the space's size (as grid search does); given, it is refused. A space of
    fixed values is one configuration, run as one trial (sweep.make_searcher). `search`: a
    SearchConfig; `given`: whether the file sets num_trials. Returns the SearchConfig to use."""
    n, size = search.num_trials, space.distinct
    if n <= size:
        return search
    if not given:
        return replace(search, num_trials=int(size))
    if size == 1:
        raise ConfigError("search.num_trials", f"is {n} but the search space fixes every value: all {n} trials "
                          "would be the same configuration",
                          "give a field a range or a choice (e.g. lr: {loguniform: [1.0e-4, 1.0e-3]}), or set "
                          "search.num_trials: 1 to run this one configuration, or train it with `lmm-ray train`")
    dims = " x ".join(f"{k} {len(d.grid_values())}" for k, d in space.params.items() if d.kind != "fixed")
    raise ConfigError("search.num_trials", f"is {n} but the search space has only {size} configurations ({dims}): "
                      f"{n - size} trial(s) would repeat one with the same result",
                      f"set search.num_trials: {size} (search.algorithm: grid runs each once), or widen the space")


def not_a_search_space_file(raw: dict, path: Path, sweep_keys) -> None:
    """A search-space file (or an exported recipe) given where a sweep file goes: say what it is."""
    keys = set(map(str, raw))
    if keys & {"recipe", "lr"} and keys <= {*PARAMS, "recipes"} and not keys & set(sweep_keys):
        raise ConfigError("", f"this is a search-space file ({', '.join(map(str, raw))}), not a sweep file",
                          f"give a sweep file that uses it, `search_space: {path}` (e.g. a copy of sweeps/quickstart.yaml); "
                          f"an exported recipe trains with `lmm-ray train SWEEP --choice {path}`")


def load_search_space(path: str | Path, recipes_file: str | Path | None = None) -> SearchSpace:
    """A search-space file on its own (e.g. an exported recipe), validated."""
    external = load_recipes_file(str(recipes_file), None) if recipes_file else {}
    return parse_search_space(read_yaml(Path(path), "search_space"), external=external, source=str(path))


def trial_recipe(space_or_config, sampled: dict, *, _custom: dict | None = None):
    """The concrete RecipeSpec of one sampled configuration: the base recipe with the sampled
    recipe options applied. LoRA options are ignored for recipes without LoRA (see inactive_params);
    `lwf_*` / `wise_ft_alpha` switch those mitigations on for any recipe."""
    from lmm_ray.recipes import get_recipe

    space = getattr(space_or_config, "search_space", space_or_config)  # a SweepConfig or a SearchSpace
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

    space = getattr(space_or_config, "search_space", space_or_config)  # a SweepConfig or a SearchSpace
    values = {**space.fixed(), **sampled}
    base = get_recipe(str(values["recipe"]), space.custom_recipes())
    return set() if base.lora is not None else {k for k in LORA_PARAMS if k in values or k in space.params}


def trial_train(train: TrainConfig, sampled: dict) -> TrainConfig:
    """`train` with the searched train keys (batch_size, grad_accum, ...) of a sample applied."""
    kw = {k: PARAMS[k].type(sampled[k]) for k in TRAIN_PARAMS if sampled.get(k) is not None}
    return replace(train, **kw)


def load_recipes_file(p: str, base_dir: Path | None) -> dict:
    """name -> RecipeSpec of a sweep's `recipes_file`; a built-in recipe's name is refused."""
    from lmm_ray.recipes import RECIPES, load_recipe_file

    path = resolve_path(p, base_dir)
    if not path.is_file():
        raise ConfigError("recipes_file", f"file not found: {path}",
                          "check the path (relative to the sweep file's folder, then the current directory)")
    try:
        custom = load_recipe_file(path)
    except RecipeError as e:
        raise ConfigError("recipes_file", str(e), "see lmm_ray/recipes.yaml for the keys a recipe takes") from None
    except ConfigError as e:  # not UTF-8, not YAML, a key twice
        e.field = e.field or "recipes_file"
        raise
    if not custom:
        raise ConfigError("recipes_file", f"{path} defines no recipe (empty, or only comments)",
                          "define one, e.g. `my_attn_o: {roles: [llm.attn.o]}`, or remove recipes_file")
    for n in custom:
        if n in RECIPES:
            raise ConfigError("recipes_file", f"recipe {n!r} is a built-in recipe's name", f"rename it (e.g. my_{n})")
    return custom

