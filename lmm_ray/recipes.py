"""Recipes: which parameters a fine-tuning run unfreezes, declared as data (recipes.yaml).

`resolve` turns a recipe into the exact parameter names of a given model; `apply` freezes
everything and unfreezes exactly those (or wraps the model with peft LoRA adapters on them).
A recipe that matches nothing, names a role the family lacks, or a layer range outside the
model is an error naming the recipe, the family and the valid choices: never a silent no-op.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lmm_ray.errors import RecipeError
from lmm_ray.families import ROLE_ORDER, Family
from lmm_ray.registry import Registry, did_you_mean


@dataclass(frozen=True)
class LoraSpec:
    roles: tuple[str, ...] = ("llm.mlp.gate", "llm.mlp.up", "llm.mlp.down")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    roles: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    layers: str | None = None
    last_n: int | None = None
    lora: LoraSpec | None = None
    lwf: dict | None = None  # {"weight": float, "temperature": float}
    wise_ft: dict | None = None  # {"alpha": float}
    description: str = ""

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> "RecipeSpec":
        if not isinstance(d, dict):
            raise RecipeError(f"recipe {name!r}: expected a mapping of recipe keys, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - {"name"}
        for k in d:
            if k not in known:
                raise RecipeError(
                    f"recipe {name!r}: unknown key {k!r}.{did_you_mean(k, known)} Valid keys: {', '.join(sorted(known))}"
                )
        _check_fields(name, d)
        kw = dict(d)
        for key in ("roles", "patterns"):
            v = kw.get(key, ())
            kw[key] = (v,) if isinstance(v, str) else tuple(v)
        for p in kw["patterns"]:
            try:
                re.compile(p)
            except re.error as e:
                raise RecipeError(f"recipe {name!r}: pattern {p!r} is not a valid regex ({e})") from None
        if kw.get("layers") is not None:
            kw["layers"] = str(kw["layers"])
        if kw.get("lora") is not None:
            lo = dict(kw["lora"])
            bad = set(lo) - {f.name for f in fields(LoraSpec)}
            if bad:
                raise RecipeError(f"recipe {name!r}: unknown lora key(s) {sorted(bad)}; valid: roles, rank, alpha, dropout")
            if "roles" in lo:
                lo["roles"] = (lo["roles"],) if isinstance(lo["roles"], str) else tuple(lo["roles"])
            kw["lora"] = LoraSpec(**lo)
        if kw.get("layers") is not None and kw.get("last_n") is not None:
            raise RecipeError(f"recipe {name!r}: give either 'layers' or 'last_n', not both")
        if kw.get("lora") is not None and kw.get("wise_ft") is not None:
            # Blending LoRA's A and B separately does not interpolate their product, the weight change.
            raise RecipeError(f"recipe {name!r}: wise_ft interpolates weights and does not combine with lora; "
                              "use it with a recipe that trains weights directly (e.g. mlp)")
        spec = cls(name=name, **kw)
        if not (spec.roles or spec.patterns or spec.lora):
            raise RecipeError(f"recipe {name!r}: names no 'roles', 'patterns' or 'lora': it would train nothing")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (`from_dict(name, to_dict())` gives the spec back)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "name" or v in (None, (), ""):
                continue
            if isinstance(v, LoraSpec):
                v = {k.name: (list(getattr(v, k.name)) if k.name == "roles" else getattr(v, k.name)) for k in fields(LoraSpec)}
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def with_options(self, **overrides) -> "RecipeSpec":
        """A copy with searched options applied (e.g. lora rank, layers) — used by search spaces."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}
        if self.lora is not None:
            lo = {f.name: getattr(self.lora, f.name) for f in fields(LoraSpec)}
            for k in list(overrides):
                if k.startswith("lora_"):
                    lo[k[5:]] = overrides.pop(k)
            d["lora"] = lo
        d.update({k: v for k, v in overrides.items() if v is not None})
        return RecipeSpec.from_dict(self.name, d)


def _check_fields(name: str, d: dict) -> None:
    """Every value of a recipe checked with the rules the search space uses for the same option
    (space.PARAMS), so a recipe file fails as clearly as a sweep file: field path, problem, fix."""
    from lmm_ray.errors import ConfigError
    from lmm_ray.schema import UNIT, UNIT_CLOSED, R, check_value, ge, gt

    # layers and last_n: their types here; their ranges against the model's layers in resolve()
    rules = {"layers": R(str), "last_n": R(int), "lora.rank": R(int, ge(1)), "lora.alpha": R(float, gt(0)),
             "lora.dropout": R(float, UNIT), "lwf.weight": R(float, ge(0)), "lwf.temperature": R(float, gt(0)),
             "wise_ft.alpha": R(float, UNIT_CLOSED)}
    subkeys = {"lwf": ("weight", "temperature"), "wise_ft": ("alpha",)}
    try:
        for key in ("layers", "last_n"):
            if d.get(key) is not None:
                check_value(str(d[key]) if key == "layers" and isinstance(d[key], int) else d[key], rules[key], key)
        if not isinstance(d.get("description", ""), str):
            raise ConfigError("description", f"expected text, got {d['description']!r}", "quote it")
        for key in ("roles", "patterns"):
            v = d.get(key, ())
            if not (isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v))):
                raise ConfigError(key, f"expected a list of names, got {v!r}", f"write e.g. {key}: [llm.attn.q, llm.attn.v]")
        for block in ("lora", "lwf", "wise_ft"):
            sub = d.get(block)
            if sub is None:
                continue
            if not isinstance(sub, dict):
                raise ConfigError(block, f"expected a mapping, got {sub!r}", f"write e.g. {block}: {{...}} (see lmm_ray/recipes.yaml)")
            for k, v in sub.items():
                if f"{block}.{k}" in rules:
                    check_value(v, rules[f"{block}.{k}"], f"{block}.{k}")
                elif block in subkeys and k not in subkeys[block]:
                    raise ConfigError(f"{block}.{k}", f"unknown key {k!r}", f"valid keys: {', '.join(subkeys[block])}")
    except ConfigError as e:
        raise RecipeError(f"recipe {name!r}, field {e.field}: {e.problem}" + (f" (fix: {e.fix})" if e.fix else "")) from None


def load_recipe_file(path: str | Path) -> dict[str, RecipeSpec]:
    """User-defined recipes: a YAML mapping `name: {roles: [...], patterns: [...], ...}`."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    from lmm_ray import yamlfile

    data = yamlfile.load(path) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(path)!r}: expected a mapping of recipe name -> spec")
    return {name: RecipeSpec.from_dict(name, d) for name, d in data.items()}


RECIPES: Registry[RecipeSpec] = Registry("recipe")
for _name, _spec in load_recipe_file(Path(__file__).with_name("recipes.yaml")).items():
    RECIPES.register(_name, _spec)


def get_recipe(recipe: str | RecipeSpec, custom: dict[str, RecipeSpec] | None = None) -> RecipeSpec:
    if isinstance(recipe, RecipeSpec):
        return recipe
    if custom and recipe in custom:
        return custom[recipe]
    if recipe not in RECIPES:
        names = sorted([*RECIPES.names(), *(custom or {})])
        raise RecipeError(f"unknown recipe {recipe!r}.{did_you_mean(recipe, names)} Valid choices: {', '.join(names)}")
    return RECIPES.get(recipe)


# ---------------------------------------------------------------------------------------------
# Resolution


def classify(family: Family, name: str) -> tuple[str, int | None]:
    """(role, LLM layer index or None) of one parameter name; 'other' if no role claims it."""
    for role, pats in family.compiled_roles().items():
        for p in pats:
            m = p.fullmatch(name)
            if m:
                layer = m.groupdict().get("layer")
                return role, int(layer) if layer is not None else None
    return "other", None


def _expand_roles(spec: RecipeSpec, family: Family, roles: tuple[str, ...]) -> set[str]:
    valid = [*ROLE_ORDER, *[r for r in family.roles if r not in ROLE_ORDER]]
    out: set[str] = set()
    for r in roles:
        hits = [v for v in valid if fnmatch.fnmatchcase(v, r)]
        if r == "*":
            hits.append("other")
        if not hits:
            raise RecipeError(
                f"recipe {spec.name!r} on family {family.name!r}: unknown role {r!r}.{did_you_mean(r, valid)} "
                f"Valid roles: {', '.join(valid)} (globs like 'llm.*' allowed)"
            )
        out.update(hits)
    return out


def _parse_layers(spec: RecipeSpec, family: Family, n_layers: int) -> set[int] | None:
    if spec.last_n is not None:
        if not 1 <= int(spec.last_n) <= n_layers:
            raise RecipeError(
                f"recipe {spec.name!r}: last_n={spec.last_n} is outside the model ({family.name} has {n_layers} LLM layers)"
            )
        return set(range(n_layers - int(spec.last_n), n_layers))
    if spec.layers is None:
        return None
    chosen: set[int] = set()
    for part in spec.layers.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise RecipeError(f"recipe {spec.name!r}: layers {spec.layers!r} must look like '16-27' or '0,2,5'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= n_layers:
            raise RecipeError(
                f"recipe {spec.name!r}: layers {spec.layers!r} are outside the model "
                f"({family.name} has {n_layers} LLM layers, valid indices 0-{n_layers - 1})"
            )
        chosen.update(range(lo, hi + 1))
    return chosen


@dataclass
class Resolved:
    recipe: RecipeSpec
    family: str
    names: list[str]  # parameters to unfreeze (for LoRA: the base weights the adapters sit on)
    by_role: dict[str, int]  # trainable parameter count per role
    trainable: int
    total: int
    lora_targets: list[str] = field(default_factory=list)  # module names

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def resolve(model, family: Family, recipe: str | RecipeSpec, custom: dict[str, RecipeSpec] | None = None) -> Resolved:
    """The exact parameters a recipe trains on this model (works on a meta-device model too)."""
    spec = get_recipe(recipe, custom)
    params = dict(model.named_parameters())
    info = {n: classify(family, n) for n in params}
    n_layers = 1 + max((layer for _, layer in info.values() if layer is not None), default=-1)
    layer_set = _parse_layers(spec, family, n_layers)

    def select(roles: tuple[str, ...], patterns: tuple[str, ...]) -> list[str]:
        wanted = _expand_roles(spec, family, roles)
        for r in roles:
            if "*" not in r and not any(info[n][0] == r for n in params):
                raise RecipeError(
                    f"recipe {spec.name!r}: role {r!r} matches no parameter of family {family.name!r} "
                    f"(this family cannot express it). Roles present: "
                    f"{', '.join(sorted({role for role, _ in info.values()}))}"
                )
        pats = [re.compile(p) for p in patterns]
        names = [n for n in params if info[n][0] in wanted or any(p.fullmatch(n) for p in pats)]
        if layer_set is not None:
            # A layer restriction keeps LLM decoder-layer parameters in range and drops the LLM's
            # non-layer parameters (embeddings, head, final norm); vision/projector are unaffected.
            names = [
                n for n in names
                if ((info[n][1] in layer_set) if info[n][1] is not None else not info[n][0].startswith("llm."))
            ]
        return names

    total = sum(p.numel() for p in params.values())
    if spec.lora is not None:
        base = select(spec.lora.roles, ())
        targets = [n[: -len(".weight")] for n in base if n.endswith(".weight") and params[n].dim() == 2]
        if not targets:
            raise _nothing(spec, family)
        by_role: dict[str, int] = {}
        for t in targets:  # an adapter pair A (r x in) and B (out x r) per Linear
            out_f, in_f = params[t + ".weight"].shape
            role = info[t + ".weight"][0]
            by_role[role] = by_role.get(role, 0) + spec.lora.rank * (in_f + out_f)
        adapters = sum(by_role.values())
        names = select(spec.roles, spec.patterns) if (spec.roles or spec.patterns) else []
        for n in names:  # base parameters a LoRA recipe also unfreezes (e.g. norms)
            by_role[info[n][0]] = by_role.get(info[n][0], 0) + params[n].numel()
        trainable = adapters + sum(params[n].numel() for n in names)
        return Resolved(spec, family.name, names, by_role, trainable, total + adapters, targets)
    names = select(spec.roles, spec.patterns)
    if not names:
        raise _nothing(spec, family)
    by_role = {}
    for n in names:
        by_role[info[n][0]] = by_role.get(info[n][0], 0) + params[n].numel()
    return Resolved(spec, family.name, names, by_role, sum(params[n].numel() for n in names), total)


def _nothing(spec: RecipeSpec, family: Family) -> RecipeError:
    return RecipeError(
        f"recipe {spec.name!r} matches no parameter of family {family.name!r} "
        f"(roles={list(spec.roles)}, patterns={list(spec.patterns)}, layers={spec.layers}, last_n={spec.last_n}). "
        f"Valid roles: {', '.join(family.roles)}"
    )


def apply(model, family: Family, recipe: str | RecipeSpec, custom: dict[str, RecipeSpec] | None = None):
    """Freeze everything, then unfreeze exactly the resolved parameters. Returns (model, Resolved);
    for LoRA recipes the returned model is the peft-wrapped one."""
    res = resolve(model, family, recipe, custom)
    for p in model.parameters():
        p.requires_grad_(False)
    if res.lora_targets:
        from peft import LoraConfig, get_peft_model

        lo = res.recipe.lora
        # Full module names (not suffixes): peft would otherwise also match vision-tower q_proj/mlp.
        model = get_peft_model(
            model,
            LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=res.lora_targets),
        )
        wanted = {"base_model.model." + n for n in res.names}
        for n, p in model.named_parameters():
            if n in wanted:
                p.requires_grad_(True)
        return model, res
    wanted = set(res.names)
    for n, p in model.named_parameters():
        if n in wanted:
            p.requires_grad_(True)
    return model, res


def audit(model, family: Family, recipes: list[str] | None = None, custom: dict[str, RecipeSpec] | None = None) -> dict:
    """{recipe: {"trainable": int, "total": int, "roles": {role: int}}} for the CLI's table."""
    out = {}
    for name in recipes or [*RECIPES.names(), *(custom or {})]:
        r = resolve(model, family, name, custom)
        out[name] = {"trainable": r.trainable, "total": r.total, "roles": dict(sorted(r.by_role.items(), key=lambda kv: _role_key(kv[0])))}
    return out


def _role_key(role: str) -> int:
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)
