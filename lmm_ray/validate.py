"""Everything that can be checked before Ray starts and needs more than the sweep file itself:
the model's configuration, data files, this machine, the tracking server.

Data sources are opened here, before Ray starts (`check_data_sources`): local LLaVA JSON files
are parsed and every record checked, every kept record's image must exist and up to
`IMAGES_DECODED` of them (spread over the file) must decode; local Hugging Face copies are opened
(memory-mapped) and their config, split, columns and rows checked. With `check_data=True`
(`--check-data`) each hub dataset's published schema is read too (features only, no images).
Sources that could not be checked (hub datasets without `--check-data`, offline, or without a
published schema) are returned and listed in the plan.

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
from lmm_ray.schema import mask_secrets
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

    looked_in = [Path(d) / cfg.model for d in (cfg.base_dir, Path.cwd()) if d]
    try:
        family, mconf = models.model_config(cfg.model, offline=offline, looked_in=looked_in)
    except models.ModelNotFound as e:
        raise ConfigError("model", e.reason, models.HUB_FIX) from None
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


def data_sources(cfg: SweepConfig) -> list[tuple[str, dict]]:
    """(field path in the sweep file, source) of every real-data source."""
    sources = [(f"stages.{i}.data", s.data) for i, s in enumerate(cfg.stages)]
    sources += [(f"stages.{i}.eval_data", s.eval_data) for i, s in enumerate(cfg.stages)]
    sources += [(f"heldout.{i}.data", h.data) for i, h in enumerate(cfg.heldout)]
    return [(w, s) for w, s in sources if s]


def check_data_paths(cfg: SweepConfig) -> None:
    """The paths of local sources exist (their contents: check_data_sources)."""
    for where, src in data_sources(cfg):
        for key in ("llava_json", "dataset_yaml", "image_folder"):
            if key in src and src[key] and not Path(src[key]).exists():
                raise ConfigError(f"{where}.{key}", f"{src[key]} does not exist", "fix the path (relative paths resolve against the sweep file)")
        hf = src.get("hf")
        if hf and (hf.startswith(("/", ".", "~")) and not Path(os.path.expanduser(hf)).exists()):
            raise ConfigError(f"{where}.hf", f"local dataset {hf} does not exist", "fix the path, or give a hub id")


check_data = check_data_paths  # the old name (check()'s parameter of that name is the --check-data flag)


# ---------------------------------------------------------------------------------------------
# Data sources, opened

IMAGES_DECODED = 32  # per source: enough to catch a wrong folder or format, cheap on a 40k-record file


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over 0..n-1 (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def _check_images(where: str, src: dict, pending: list, key: str) -> None:
    """Every kept record's image exists; IMAGES_DECODED of them decode."""
    from lmm_ray.errors import DataError
    from lmm_ray.skills.loaders import HFImage, _open_image

    field = f"{where}.image_folder" if src.get("image_folder") else f"{where}.{key}"
    fix = ("fix image_folder (relative image paths resolve against it) or the record's image path"
           if key in ("llava_json", "dataset_yaml") else "fix the image column or the dataset copy")
    seen: set = set()
    for p in pending:
        img = p.image
        if isinstance(img, (str, Path)) and img not in seen:
            seen.add(img)
            if not Path(img).is_file():
                raise ConfigError(field, f"{p.where}: image not found at {img}", fix)
    for i in _spread(len(pending), IMAGES_DECODED):
        try:
            _open_image(pending[i])
        except DataError as e:
            raise ConfigError(field if not isinstance(pending[i].image, HFImage) else f"{where}.{key}", str(e), fix) from None


def _hf_args(where: str, src: dict) -> tuple[dict, str, dict]:
    """(plan_hf_dataset arguments, the key naming the dataset, {source key -> field path})."""
    from lmm_ray.skills import benchmarks

    if "benchmark" not in src:
        keys = {k: f"{where}.{k}" for k in ("config", "split", "hf", "columns", "filter")}
        return {k: v for k, v in src.items() if k != "hf"}, "hf", keys
    r = benchmarks.resolve(src)
    # A preset's config, columns and filter are not in the sweep file: a mismatch is the local
    # copy's (`path`) or the preset's, so the field is the benchmark (or its path).
    at = f"{where}.path" if src.get("path") else f"{where}.benchmark"
    keys = {k: at for k in ("config", "hf", "columns", "filter")}
    keys["split"] = f"{where}.split" if "split" in src else at
    args = {k: r[k] for k in ("split", "config", "revision", "columns", "filter", "multi_image", "n", "seed",
                              "answer_type", "skill") if r.get(k) is not None}
    return {**args, "_id": r["hf"]}, "benchmark", keys


def _check_hf(where: str, src: dict, skip_hub: str | None) -> str | None:
    """Check an hf / benchmark source; return why it was not checked, or None. A hub dataset is
    read only when `skip_hub` (the reason not to) is None."""
    from lmm_ray.errors import DataError
    from lmm_ray.skills import hub as H

    args, key, fields = _hf_args(where, src)
    ident = args.pop("_id", None) or src["hf"]
    local = Path(str(ident)).expanduser().exists() or str(ident).startswith(("/", ".", "~"))
    if not local and skip_hub is not None:
        return f"{where}: hub dataset {ident} ({skip_hub})"
    split, config = args.get("split", "train"), args.get("config")
    fix = {"config": "set `config:` to one of the dataset's configs", "split": "set `split:` to one of its splits",
           "hf": "fix the dataset id or path"}
    try:
        cols = H.dataset_columns(ident, split=split, config=config, revision=args.get("revision"))
        if cols is None:
            return f"{where}: hub dataset {ident} publishes no schema (columns not checked)"
        H.check_columns(cols, H._check_columns(args.get("columns"), ident), H._check_filter(args.get("filter"), ident),
                        H._describe(ident, config, split))
        if local:  # rows (text) and a spread of images: what the trial would read
            plan = H.plan_hf_dataset(ident, **args)
            if not len(plan):
                raise ConfigError(fields["hf"], f"{ident}: no rows to use (split {split!r})", "check split, filter and n")
            _check_images(where, {}, plan.items, "path" if key == "benchmark" else "hf")
    except ConnectionError as e:
        return f"{where}: hub dataset {ident} (unreachable: {str(e)[:80]})"
    except DataError as e:
        tag = getattr(e, "field", "hf")
        top = tag.split(".")[0]
        field = fields.get(top, f"{where}.{key}")
        if field == f"{where}.{top}" and "." in tag:
            field = f"{where}.{tag}"  # columns.answer, filter.data_type
        raise ConfigError(field, str(e), fix.get(top, "fix the column map or filter (docs/sweep_config.md)")) from None
    return None


def check_data_sources(cfg: SweepConfig, *, hub: bool = False, offline: bool = False) -> list[str]:
    """Open every local data source and check it; with `hub` (and not `offline`) read each hub
    dataset's schema. Raises ConfigError naming the source's field; returns what was not checked."""
    from lmm_ray.errors import DataError
    from lmm_ray.skills.loaders import _plan_dataset_yaml, _plan_llava

    unchecked: list[str] = []
    skip_hub = None if hub and not offline else "offline" if offline else "schema not read: validate with --check-data"
    for where, src in data_sources(cfg):
        key = next(k for k in ("llava_json", "dataset_yaml", "hf", "benchmark") if k in src)
        if key in ("llava_json", "dataset_yaml"):
            seed = src.get("seed", 0)
            try:
                pending = (_plan_llava(src[key], src.get("image_folder"), src.get("sampling", "all"), seed,
                                       src.get("answer_type"), src.get("skill")) if key == "llava_json"
                           else _plan_dataset_yaml(src[key], src.get("image_folder"), seed))
            except DataError as e:
                raise ConfigError(f"{where}.{key}", str(e), "fix the file as the message says (a record: "
                                  '{"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]})') from None
            if not pending:
                raise ConfigError(f"{where}.{key}", f"{src[key]} has no records" + (
                    f" left after sampling {src['sampling']!r}" if src.get("sampling") else ""),
                    "point it at a file with records")
            _check_images(where, src, pending, key)
            continue
        why = _check_hf(where, src, skip_hub)
        if why is not None:
            if skip_hub is None and "(unreachable:" in why:
                skip_hub = "hub unreachable"  # one timeout is enough: the other hub sources are not tried
            unchecked.append(why)
    return unchecked


def check_local_resources(cfg: SweepConfig, address: str | None) -> str | None:
    """Local runs only (on a cluster the check runs after connecting: cluster.check_cluster_resources).

    Counts what the local Ray that sweep.init_ray starts will have: `os.cpu_count()` CPUs, the GPUs
    torch sees, and the memory left after the object store. One trial is its Ray Train workers
    (cluster.worker_bundle each) plus its driver (cluster.TRIAL_DRIVER_RESOURCES: one byte of
    memory, no CPU, so 2 one-CPU workers fit a 2-core machine). A trial that cannot be placed is
    refused (Ray would wait for resources that never come); more trials at once than fit is
    fine (they queue) and returns the plan's note saying so."""
    from lmm_ray import cluster

    if address or os.environ.get("RAY_ADDRESS"):
        return None
    r = cfg.resources
    cpus = os.cpu_count() or 1
    need_cpu = r.num_workers * r.cpus_per_worker + float(cluster.TRIAL_DRIVER_RESOURCES.get("CPU", 0))
    if need_cpu > cpus + 1e-6:
        raise ConfigError("resources.num_workers", f"a trial needs {r.num_workers} workers x {r.cpus_per_worker:g} CPUs "
                          f"= {need_cpu:g} CPUs, this machine has {cpus} (Ray gets them all)",
                          f"lower resources.num_workers or resources.cpus_per_worker (at most {cpus} CPUs per trial), or run on a cluster")
    gpus = 0
    if r.gpus_per_worker:
        import torch

        gpus = torch.cuda.device_count()
        need = r.num_workers * r.gpus_per_worker
        if need > gpus:
            raise ConfigError("resources.gpus_per_worker", f"a trial needs {need:g} GPUs, this machine has {gpus}",
                              "set resources.gpus_per_worker: 0 to train on CPU, or run on a cluster with GPUs")
    import psutil  # installed with peft (a dependency); Ray ships its own copy too

    free = psutil.virtual_memory().available  # what Ray itself reads for its `memory` resource
    if free < cluster.LOCAL_OBJECT_STORE_BYTES + MIN_FREE_BYTES:
        raise ConfigError("resources", f"this machine has {free / 2**20:.0f} MiB of memory free; Ray's object store alone "
                          f"takes {cluster.LOCAL_OBJECT_STORE_BYTES / 2**20:.0f} MiB and each worker loads the model",
                          "free memory (stop other jobs) or run on a cluster (--address)")
    fit = int(cpus // need_cpu) if need_cpu else cfg.search.max_concurrent
    if r.gpus_per_worker:
        fit = min(fit, int(gpus // (r.num_workers * r.gpus_per_worker)))
    if cfg.search.max_concurrent > fit and cfg.search.num_trials > fit:
        at = "one at a time" if fit == 1 else f"{fit} at a time"
        return (f"queue      search.max_concurrent is {cfg.search.max_concurrent}, but this machine holds {fit} trial(s) "
                f"({need_cpu:g} CPUs" + (f" + {r.num_workers * r.gpus_per_worker:g} GPUs" if r.gpus_per_worker else "")
                + f" each, of {cpus} CPUs" + (f", {gpus} GPUs" if r.gpus_per_worker else "") + f"): trials run {at}, the rest wait")
    return None


MIN_FREE_BYTES = 512 * 2**20  # Ray's own processes (GCS, raylet, dashboard) before any worker


def check_storage(cfg: SweepConfig) -> None:
    """A local sweep folder is created (or found writable) now, before Ray starts: a file in its
    place, a read-only place or a system folder fail here, with the fix."""
    from lmm_ray import private
    from lmm_ray.schema import is_uri

    if is_uri(cfg.sweep_dir):
        return  # object storage: checked by pyarrow when the sweep first writes to it
    folder = Path(cfg.sweep_dir)
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError("storage", f"{p} is a file, so the sweep folder {folder} cannot be made there",
                              "give storage a folder (it is created if missing), e.g. storage: runs")
    try:
        private.make_sweep_dir(folder)  # private to its user (private.py)
        probe = folder / ".lmm_ray_write_check"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError("storage", f"cannot write the sweep folder {folder}: {e.strerror or e}",
                          "give storage a folder you can write (it is created if missing), e.g. storage: runs") from None


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


def check_resolution(cfg: SweepConfig, family: str, offline: bool = False) -> None:
    """The `data` caps are ones the model's family can honour (resolution.check)."""
    from lmm_ray import models, resolution

    if cfg.data.max_pixels is None and cfg.data.min_pixels is None:
        return  # the defaults always apply
    _, mconf = models.model_config(cfg.model, offline=offline)
    resolution.check(family, mconf, cfg.data.max_pixels, cfg.data.min_pixels)


def check(cfg: SweepConfig, *, address: str | None = None, offline: bool = False, check_data: bool = False) -> str:
    """Raise ConfigError on the first problem; return the plan. `check_data` (`--check-data`)
    also reads each hub dataset's schema (network)."""
    check_data_paths(cfg)
    unchecked = check_data_sources(cfg, hub=check_data, offline=offline)
    queue = None
    if not offline:  # offline checks the files against the model's configuration only
        queue = check_local_resources(cfg, address)
    family, trainable = check_recipes(cfg, offline=offline)
    check_resolution(cfg, family, offline=offline)
    check_lmms_tasks(cfg)
    check_runtime(cfg, address, offline)
    mem = check_memory(cfg)
    if not offline:
        check_storage(cfg)
        check_tracking(cfg)
    return plan(cfg, family, trainable, unchecked) + (f"\n{queue}" if queue else "") + "\n" + mem


def _search_line(cfg: SweepConfig) -> str:
    s, sp = cfg.search, cfg.search_space
    if not sp.searched:
        return "search     one fixed configuration (no value is searched): 1 trial, Tune's default search"
    line = f"search     {s.algorithm}, {s.num_trials} trials, {s.max_concurrent} at a time, seed {s.seed}"
    if s.algorithm != "grid" and s.num_trials == sp.distinct and s.num_trials > 1:
        line += f" (the space has exactly {s.num_trials} configurations: {s.algorithm} may repeat some; grid runs each once)"
    return line


def plan(cfg: SweepConfig, family: str, trainable: dict, unchecked: list[str] = ()) -> str:
    from lmm_ray import resolution

    sp = cfg.search_space
    dims = ", ".join(f"{k}={d.to_yaml()}" for k, d in sp.params.items())
    r = cfg.resources
    lines = [
        f"sweep      {cfg.name}",
        f"model      {cfg.model} ({family})",
        f"stages     {' -> '.join(f'{s.name} ({s.steps} steps)' if s.steps else f'{s.name} ({s.epochs} epochs)' for s in cfg.stages)}",
        f"held-out   {', '.join(cfg.heldout_names)}",
        _search_line(cfg),
        f"space      {dims}",
        "recipes    " + ", ".join(f"{k} ({v:,} trainable)" for k, v in trainable.items()),
        f"objective  {cfg.objective.mode}" + (f": learning + {cfg.objective.lam:g}*min(0, held-out change) - {cfg.objective.mu:g}*counting bias"
                                               if cfg.objective.mode == "scalar" else ": (learning, held-out change, counting bias)"),
        f"scheduler  {cfg.scheduler.type}",
        f"images     {resolution.describe(family, cfg.model, cfg.data.max_pixels, cfg.data.min_pixels)}; "
        f"{cfg.data.num_workers} loader worker(s) per rank",
        f"resources  {r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU" + (f" + {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else "") + f" per trial ({r.strategy})",
        f"storage    {cfg.sweep_dir}",
        f"mlflow     {mask_secrets(cfg.mlflow_uri)} (experiment {cfg.experiment!r})",
    ]
    lines += [f"unchecked  {u}" for u in unchecked]
    return "\n".join(lines)
