"""The rule engine of sweep files: typed values, flat sections, YAML reading, paths.

Every field of a sweep or search-space file is checked by one `Rule` (type, range, choices); a
bad value raises `ConfigError` whose `field` is the dotted path of the value (`train.batch_size`)
and whose message says what is wrong and how to fix it. The flat sections of a sweep file
(`train`, `eval`, `data`, `search`, `scheduler`, `objective`, `resources`, `tracking`) are declared here
as frozen dataclasses next to their rules; `config.py` assembles them into a `SweepConfig` and
`space.py` reuses the same rules for searched parameters. See docs/sweep_config.md for every field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple

from lmm_ray.errors import ConfigError
from lmm_ray.registry import did_you_mean

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # PyYAML reads `1e-4` as a string
_LAYERS_RE = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_URI_RE = re.compile(r"[a-z][a-z0-9+.-]*://")


_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")


def mask_secrets(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` in it replaced by ***: what
    is printed, written to the sweep folder or logged to MLflow (a tracking URI may hold one)."""
    return _CREDENTIALS_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def is_uri(s: str) -> bool:
    """`scheme://...` (s3://, gs://, http://, sqlite://): the one test for "not a plain path".
    Sweep storage given as file:// is turned into a plain path when the sweep file is parsed."""
    return bool(_URI_RE.match(str(s)))


def join(*parts) -> str:
    return ".".join(str(p) for p in parts if p != "")


def tname(v) -> str:
    return "null" if v is None else type(v).__name__


def unknown_key(where: str, key, allowed) -> ConfigError:
    hint = did_you_mean(key, allowed).strip()
    return ConfigError(join(where, key), f"unknown key {key!r}",
                       f"{hint + ' ' if hint else ''}Valid keys here: {', '.join(sorted(map(str, allowed)))}")


def check_mapping(d, where: str, allowed, required=(), example: str = "") -> dict:
    if not isinstance(d, dict):
        raise ConfigError(where, f"expected a mapping, got {tname(d)} ({d!r})",
                          example or f"write it as `key: value` lines; valid keys: {', '.join(sorted(allowed))}")
    for k in d:
        if k not in allowed:
            raise unknown_key(where, k, allowed)
    for k in required:
        if k not in d:
            raise ConfigError(join(where, k), "is required but missing", f"add `{k}: ...`" + (f" ({example})" if example else ""))
    return d


# ---------------------------------------------------------------------------------------------
# Typed values: one rule per field, shared by sections and search-space parameters


class Rule(NamedTuple):
    type: type  # int, float, bool or str
    test: Callable[[Any], bool] | None = None
    need: str = ""  # what `test` requires, for the message
    choices: tuple = ()
    nullable: bool = False


def ge(x):
    return lambda v: v >= x, f">= {x}"


def gt(x):
    return lambda v: v > x, f"> {x}"


UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
UNIT_CLOSED = (lambda v: 0 <= v <= 1, "in [0, 1]")


def layers_ok(v: str) -> bool:
    if not _LAYERS_RE.fullmatch(v):
        return False
    return all(int(a) <= int(b or a) for a, b in re.findall(r"(\d+)(?:-(\d+))?", v))


def R(t: type, check=None, *, choices=(), nullable=False) -> Rule:
    test, need = check or (None, "")
    return Rule(t, test, need, tuple(choices), nullable)


def check_value(v, rule: Rule, where: str):
    """v checked (and converted) against a rule; bool is never accepted as a number."""
    if v is None:
        if rule.nullable:
            return None
        raise ConfigError(where, "is null", f"give a {rule.type.__name__} value, or remove the key for its default")
    t = rule.type
    if t is bool:
        if not isinstance(v, bool):
            raise ConfigError(where, f"expected true or false, got {tname(v)} {v!r}", "write true or false")
    elif t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(where, f"expected a whole number, got {tname(v)} {v!r}",
                              "write an integer such as 16 (not a string, bool or 16.0)")
    elif t is float:
        if isinstance(v, str) and _FLOAT_RE.fullmatch(v.strip()):
            v = float(v)  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(where, f"expected a number, got {tname(v)} {v!r}", "write a number such as 0.001 or 1.0e-3")
        v = float(v)
    elif t is str:
        if isinstance(v, int) and not isinstance(v, bool) and rule.test is layers_ok:
            v = str(v)  # `layers: 3`
        if not isinstance(v, str) or not v:
            raise ConfigError(where, f"expected a non-empty string, got {tname(v)} {v!r}", "write a string")
    if rule.choices and v not in rule.choices:
        raise ConfigError(where, f"{v!r} is not a valid choice.{did_you_mean(v, rule.choices)}",
                          f"use one of: {', '.join(map(str, rule.choices))}")
    if rule.test is not None and not rule.test(v):
        raise ConfigError(where, f"{v!r} is out of range: must be {rule.need}", f"use a value {rule.need}")
    return v


def read_section(raw: dict, key: str, cls, rules: dict[str, Rule], yaml_names: dict[str, str] | None = None):
    """A flat section (train, eval, ...) into its dataclass; missing keys keep their defaults."""
    d = raw.get(key)
    d = {} if d is None else check_mapping(d, key, rules)
    names = yaml_names or {}
    kw = {}
    for f in fields(cls):
        yk = names.get(f.name, f.name)
        if yk in d:
            kw[f.name] = check_value(d[yk], rules[yk], join(key, yk))
    return cls(**kw)


def section_dict(obj, yaml_names: dict[str, str] | None = None) -> dict:
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
    precision: str = "auto"  # compute dtype: auto = bf16 on a GPU, fp32 on the CPU
    weight_dtype: str = "auto"  # storage of frozen weights: auto = bf16 on a GPU, fp32 on the CPU
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    n_per_skill: int = 64
    batch_size: int = 64
    max_new_tokens: int = 8
    image_size: int = 64
    seed: int = 10000
    caption_probe_n: int = 8  # images per held-out skill for the caption probe (0: off)
    caption_tokens: int = 16  # tokens generated per caption
    lmms_include_path: str | None = None  # a folder of your own lmms-eval task YAMLs (absolute once parsed)


@dataclass(frozen=True)
class DataConfig:
    """How samples are read and processed, for training and evaluation alike (one processor)."""

    max_pixels: int | None = None  # null: the family's default (resolution.py), lmms-eval's for real Qwen
    min_pixels: int | None = None
    num_workers: int = 0  # DataLoader worker processes per rank; 0: in the training process


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
    # The hypervolume's reference point: the worst trial a user would still accept (pareto.reference).
    reference_learning: float = 0.0
    reference_heldout_change: float = -50.0
    reference_counting_bias: float = 0.2


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    strategy: str = "ddp"  # ddp | fsdp | auto (the memory estimate picks)
    max_failures: int = 1
    gpu_memory_gb: float | None = None  # per GPU; validate refuses a recipe that cannot fit (default: the GPU's own)
    estimate_seq_len: int = 2048  # padded tokens per sample the memory check assumes (image tokens included)


@dataclass(frozen=True)
class TrackingConfig:
    mlflow_uri: str | None = None  # resolved at parse time (see SweepConfig.mlflow_uri)
    experiment: str | None = None


TRAIN_RULES = {
    "batch_size": R(int, ge(1)),
    "grad_accum": R(int, ge(1)),
    "warmup_ratio": R(float, UNIT),
    "weight_decay": R(float, ge(0)),
    "max_grad_norm": R(float, gt(0), nullable=True),
    "n_train": R(int, ge(1)),
    "precision": R(str, choices=("auto", "fp32", "bf16")),
    "weight_dtype": R(str, choices=("auto", "fp32", "bf16")),
    "attn_implementation": R(str, choices=("sdpa", "eager", "flash_attention_2")),
    "gradient_checkpointing": R(bool),
    "seed": R(int, ge(0)),
}
EVAL_RULES = {
    "n_per_skill": R(int, ge(1)),
    "batch_size": R(int, ge(1)),
    "max_new_tokens": R(int, ge(1)),
    "image_size": R(int, ge(8)),
    "seed": R(int, ge(0)),
    "caption_probe_n": R(int, ge(0)),
    "caption_tokens": R(int, ge(1)),
    "lmms_include_path": R(str, nullable=True),
}
DATA_RULES = {
    "max_pixels": R(int, ge(1), nullable=True),
    "min_pixels": R(int, ge(1), nullable=True),
    "num_workers": R(int, ge(0)),
}
ALGORITHMS = ("tpe", "nsga2", "random", "grid")
SEARCH_RULES = {
    "algorithm": R(str, choices=ALGORITHMS),
    "num_trials": R(int, ge(1)),
    "seed": R(int, ge(0)),
    "max_concurrent": R(int, ge(1)),
    "n_startup_trials": R(int, ge(0)),
    "population_size": R(int, ge(2)),
}
SCHEDULER_RULES = {
    "type": R(str, choices=("none", "asha")),
    "grace_period": R(int, ge(1)),
    "reduction_factor": R(float, gt(1)),
}
OBJECTIVE_RULES = {"mode": R(str, choices=("scalar", "multi")), "lambda": R(float, ge(0)), "mu": R(float, ge(0)),
                   "reference_learning": R(float), "reference_heldout_change": R(float), "reference_counting_bias": R(float)}
RESOURCES_RULES = {
    "num_workers": R(int, ge(1)),
    "cpus_per_worker": R(float, gt(0)),
    "gpus_per_worker": R(float, ge(0)),
    "strategy": R(str, choices=("ddp", "fsdp", "auto")),
    "max_failures": R(int, ge(-1)),
    "gpu_memory_gb": R(float, gt(0), nullable=True),
    "estimate_seq_len": R(int, ge(1)),
}
TRACKING_RULES = {"mlflow_uri": R(str, nullable=True), "experiment": R(str, nullable=True)}
_OBJ_NAMES = {"lam": "lambda"}


# ---------------------------------------------------------------------------------------------
# Files and paths


def resolve_path(p: str, base_dir: Path | None) -> Path:
    """Absolute path: as is if absolute; else relative to the sweep file's folder if it exists there, else the CWD."""
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    if base_dir is not None and (base_dir / path).exists():
        return (base_dir / path).resolve()
    return (Path.cwd() / path).resolve()



def read_yaml(path: Path, where: str):
    if not path.is_file():
        raise ConfigError(where, f"file not found: {path}", "check the path (relative paths: the sweep file's folder, then the current directory)")
    from lmm_ray import yamlfile

    try:
        return yamlfile.load(path)
    except ConfigError as e:  # name the sweep key that points at the file, too
        e.field = e.field or where
        raise

