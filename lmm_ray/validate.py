"""Everything that can be checked before Ray starts and needs more than the sweep file itself:
the model's configuration, data files, this machine, the tracking server.

Checks that need only the file run when it is parsed (config.py, space.py); checks that need a
connected Ray cluster run right after connecting (cluster.py). `check` loads only the model's *configuration* (parameters on the meta device, no weights),
resolves every recipe the search space can produce on it, checks data files, resources and the
MLflow server, and returns the plan as text. `lmm-ray sweep` runs it first, so a bad sweep fails
in seconds with exit code 2 instead of after the cluster has been booked.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from lmm_ray.config import SweepConfig
from lmm_ray.errors import ConfigError
from lmm_ray.space import SearchSpace, trial_recipe

# Which parameters train depends on these (every value is resolved); the numeric options of LoRA,
# LwF and WiSE-FT only scale them (their range ends are checked, not every value in between).
STRUCTURAL = ("recipe", "layers", "last_n", "lora_roles")
NUMERIC = ("lora_rank", "lora_alpha", "lora_dropout", "lwf_weight", "lwf_temperature", "wise_ft_alpha")


def _recipe_combos(space: SearchSpace):
    """Every combination of the structural values the search can sample, each with the numeric
    options at both ends of their ranges: nothing the search can produce is left unresolved, and
    numeric ranges are never enumerated (a generator: nothing is built up front)."""
    dims = {k: space.params[k].grid_values() for k in STRUCTURAL if k in space.params}
    ends = {k: [space.params[k].values[0], space.params[k].values[-1]] if space.params[k].kind != "choice"
            else space.params[k].grid_values() for k in NUMERIC if k in space.params}
    for vals in itertools.product(*dims.values()):
        combo = dict(zip(dims, vals))
        for i in range(max((len(v) for v in ends.values()), default=1)):
            yield {**combo, **{k: v[min(i, len(v) - 1)] for k, v in ends.items()}}


def check_recipes(cfg: SweepConfig, offline: bool = False) -> tuple[str, dict]:
    """Resolve every recipe the search can produce on the model. Returns (family, {recipe: trainable})."""
    from lmm_ray import models, recipes

    try:
        family, mconf = models.model_config(cfg.model, offline=offline)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"cannot read the configuration of {cfg.model!r}: {e}",
                          "use a hub id this machine reaches, a local save_pretrained folder, tiny:<family> or base:<family>") from None
    meta = models.meta_model(family, mconf)
    seen: dict[str, int] = {}
    for combo in _recipe_combos(cfg.search_space):
        sampled = {**cfg.search_space.example(), **combo}
        try:
            spec = trial_recipe(cfg, sampled)
            res = recipes.resolve(meta, family, spec)
        except recipes.RecipeError as e:
            shown = ", ".join(f"{k}={v}" for k, v in combo.items())
            raise ConfigError("search_space", f"{shown} does not resolve on {cfg.model} ({family.name}): {e}",
                              "remove that value from the search space or fix the recipe") from None
        seen.setdefault(spec.name, res.trainable)
    return family.name, seen


def check_data(cfg: SweepConfig) -> None:
    sources = [(f"stages.{i}.data", s.data) for i, s in enumerate(cfg.stages)]
    sources += [(f"stages.{i}.eval_data", s.eval_data) for i, s in enumerate(cfg.stages)]
    sources += [(f"heldout.{i}.data", h.data) for i, h in enumerate(cfg.heldout)]
    for where, src in sources:
        if not src:
            continue
        for key in ("llava_json", "dataset_yaml", "image_folder"):
            if key in src and src[key] and not Path(src[key]).exists():
                raise ConfigError(f"{where}.{key}", f"{src[key]} does not exist", "fix the path (relative paths resolve against the sweep file)")
        hf = src.get("hf")
        if hf and (hf.startswith(("/", ".", "~")) and not Path(os.path.expanduser(hf)).exists()):
            raise ConfigError(f"{where}.hf", f"local dataset {hf} does not exist", "fix the path, or give a hub id")


def check_local_resources(cfg: SweepConfig, address: str | None) -> None:
    """Local runs only; on a cluster the check runs after connecting (cluster.check_cluster_resources)."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    r = cfg.resources
    cpus = os.cpu_count() or 1
    if r.num_workers * r.cpus_per_worker > cpus:
        raise ConfigError("resources.num_workers", f"a trial needs {r.num_workers} workers x {r.cpus_per_worker} CPUs, this machine has {cpus}",
                          f"lower resources.num_workers or resources.cpus_per_worker (at most {cpus} CPUs per trial), or run on a cluster")
    if r.gpus_per_worker:
        import torch

        have = torch.cuda.device_count()
        need = r.num_workers * r.gpus_per_worker
        if need > have:
            raise ConfigError("resources.gpus_per_worker", f"a trial needs {need:g} GPUs, this machine has {have}",
                              "set resources.gpus_per_worker: 0 to train on CPU, or run on a cluster with GPUs")


def check_tracking(cfg: SweepConfig) -> None:
    from lmm_ray import tracking

    try:
        tracking.check_reachable(cfg.mlflow_uri)
    except ConnectionError as e:
        raise ConfigError("tracking.mlflow_uri", str(e), "start the server or fix tracking.mlflow_uri") from None


def check_lmms_tasks(cfg: SweepConfig) -> None:
    """Held-out entries that are lmms-eval tasks: the extra is installed and every task name exists."""
    from lmm_ray import lmms_backend

    include = cfg.eval.lmms_include_path
    if include and not Path(include).is_dir():
        raise ConfigError("eval.lmms_include_path", f"{include} is not a folder", "give the folder that holds your task YAMLs")
    for i, h in enumerate(cfg.heldout):
        if not h.lmms_eval:
            continue
        try:
            lmms_backend.check_tasks([h.lmms_eval], include)
        except lmms_backend.LmmsEvalMissing as e:
            raise ConfigError(f"heldout.{i}.lmms_eval", str(e).split(";")[0], lmms_backend.INSTALL_HINT) from None
        except ValueError as e:
            raise ConfigError(f"heldout.{i}.lmms_eval", str(e), "use a task name `python -m lmms_eval --tasks list` shows, "
                              "or a benchmark preset: {name: ai2d, data: {benchmark: ai2d}}") from None


def check_runtime(cfg: SweepConfig, address: str | None, offline: bool) -> None:
    """What the trial's device and libraries must support: FSDP's block list, dtypes, attention."""
    import importlib.util

    from lmm_ray import models, parallel

    r, t = cfg.resources, cfg.train
    if r.strategy in ("fsdp", "auto") and r.num_workers > 1:
        family, mconf = models.model_config(cfg.model, offline=True) if offline else models.model_config(cfg.model)
        try:
            parallel.block_modules(models.meta_model(family, mconf), family)
        except ValueError as e:
            raise ConfigError("resources.strategy", f"FSDP cannot shard {cfg.model}: {e}",
                              "use resources.strategy: ddp, or list the family's block paths in families.py") from None
    if t.attn_implementation == "flash_attention_2":
        if not r.gpus_per_worker:
            raise ConfigError("train.attn_implementation", "flash_attention_2 runs on NVIDIA GPUs only, and this sweep trains on CPUs",
                              "use sdpa (the default), or set resources.gpus_per_worker")
        if not offline and not (address or os.environ.get("RAY_ADDRESS")) and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("train.attn_implementation", "flash_attention_2 needs the flash-attn package, which is not installed",
                              "pip install flash-attn --no-build-isolation (on the GPU nodes), or use sdpa")
    if r.gpus_per_worker and not offline and not (address or os.environ.get("RAY_ADDRESS")):
        import torch

        wants_bf16 = "bf16" in (t.weight_dtype, t.precision) or "auto" in (t.weight_dtype, t.precision)
        if torch.cuda.is_available() and wants_bf16 and not torch.cuda.is_bf16_supported():
            field = "train.weight_dtype" if t.weight_dtype != "fp32" else "train.precision"
            raise ConfigError(field, f"this GPU ({torch.cuda.get_device_name(0)}) cannot compute in bf16",
                              "set train.weight_dtype: fp32 and train.precision: fp32, or use an Ampere or newer GPU")


def check_memory(cfg: SweepConfig, budget: float | None = None) -> str:
    """The estimated per-GPU memory of every recipe of the search space (memory.py), as a table;
    refuses a recipe that cannot fit the GPU's memory with the strategy the sweep uses, naming the
    fixes that would fit. `budget`: GiB per GPU (default: resources.gpu_memory_gb, else this machine's GPU)."""
    from lmm_ray import memory

    if not cfg.resources.gpus_per_worker:
        return "memory     CPU trials: no GPU memory to check"
    budget = budget if budget is not None else memory.budget_gib(cfg)
    custom = cfg.search_space.custom_recipes()
    lines = [f"memory     GiB per GPU, micro-batch x {cfg.resources.estimate_seq_len} tokens (resources.estimate_seq_len)"
             + (f", of {budget:g} GiB" if budget else " (no budget known: resources.gpu_memory_gb)") + ":"]
    for name in dict.fromkeys(cfg.search_space.recipe_names):
        strategy = cfg.resources.strategy
        if strategy == "auto":
            strategy = memory.pick_strategy(cfg, name, budget) if cfg.resources.num_workers > 1 and budget else "fsdp"
        est = memory.estimate(cfg.model, name, custom=custom, **memory.sweep_inputs(cfg, strategy))
        lines.append(f"  {name:<14} {strategy} x{cfg.resources.num_workers}: {est['per_gpu_gib']:7.2f}")
        if budget is not None and not memory.fits(est, budget):
            fixes = memory.suggest(est, budget) or ["a GPU with more memory"]
            raise ConfigError("resources.strategy" if strategy == "ddp" else "resources.num_workers",
                              f"recipe {name!r} needs about {est['per_gpu_gib']:.1f} GiB per GPU with {strategy} over "
                              f"{cfg.resources.num_workers} worker(s); the GPUs have {budget:g} GiB",
                              "one of: " + "; ".join(fixes) + " (train.gradient_checkpointing, train.batch_size, "
                              "resources.strategy/num_workers)")
    return "\n".join(lines)


def check(cfg: SweepConfig, *, address: str | None = None, offline: bool = False) -> str:
    """Raise ConfigError on the first problem; return the plan."""
    check_data(cfg)
    if not offline:  # offline checks the files against the model's configuration only
        check_local_resources(cfg, address)
    family, trainable = check_recipes(cfg, offline=offline)
    check_lmms_tasks(cfg)
    check_runtime(cfg, address, offline)
    mem = check_memory(cfg)
    if not offline:
        check_tracking(cfg)
    return plan(cfg, family, trainable) + "\n" + mem


def plan(cfg: SweepConfig, family: str, trainable: dict) -> str:
    sp = cfg.search_space
    dims = ", ".join(f"{k}={d.to_yaml()}" for k, d in sp.params.items())
    r = cfg.resources
    lines = [
        f"sweep      {cfg.name}",
        f"model      {cfg.model} ({family})",
        f"stages     {' -> '.join(f'{s.name} ({s.steps} steps)' if s.steps else f'{s.name} ({s.epochs} epochs)' for s in cfg.stages)}",
        f"held-out   {', '.join(cfg.heldout_names)}",
        f"search     {cfg.search.algorithm}, {cfg.search.num_trials} trials, {cfg.search.max_concurrent} at a time, seed {cfg.search.seed}",
        f"space      {dims}",
        "recipes    " + ", ".join(f"{k} ({v:,} trainable)" for k, v in trainable.items()),
        f"objective  {cfg.objective.mode}" + (f": learning + {cfg.objective.lam:g}*min(0, held-out change) - {cfg.objective.mu:g}*counting bias"
                                               if cfg.objective.mode == "scalar" else ": (learning, held-out change, counting bias)"),
        f"scheduler  {cfg.scheduler.type}",
        f"resources  {r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU" + (f" + {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else "") + f" per trial ({r.strategy})",
        f"storage    {cfg.sweep_dir}",
        f"mlflow     {cfg.mlflow_uri} (experiment {cfg.experiment!r})",
    ]
    return "\n".join(lines)
