"""Train the chosen configuration through every stage, on Ray Train without Tune, saved as a full model.

The choice file is what `lmm-ray pareto --export` writes (plain values: recipe, lr, ...), so
the run is exactly one trial of the sweep, with the same stages, data and evaluation. The output
folder is a `save_pretrained` folder (model, tokenizer, processor) that transformers loads like
any checkpoint, plus `lmm_ray_metrics.json` (the per-stage history); per-stage metrics also go to
the sweep's MLflow experiment as a run tagged `lmm_ray.role = final`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmm_ray import tracking
from lmm_ray.config import load_sweep
from lmm_ray.errors import UserError
from lmm_ray.space import load_search_space


def train_choice(sweep_file: str, choice_file: str, output: str, overrides=(), log_mlflow: bool = True,
                 address: str | None = None) -> list[dict]:
    """Train the chosen configuration on Ray Train with the sweep's resources (workers, GPUs, DDP or
    FSDP), then write the full model from the last lean checkpoint. Returns the per-stage history."""
    import ray
    import ray.train
    import ray.train.torch

    from lmm_ray import checkpoint, sweep
    from lmm_ray.train import train_loop_per_worker
    from lmm_ray.trial import trial_spec

    cfg = load_sweep(sweep_file, list(overrides))
    space = load_search_space(choice_file, cfg.recipes_file)
    if space.searched:
        raise UserError(f"{choice_file}: {', '.join(space.searched)} still vary; a recipe to train must fix every value "
                        "(write the file with `lmm-ray pareto SWEEP --export FILE`)")
    cfg = replace(cfg, search_space=space)
    sampled = space.example()
    spec = trial_spec(cfg, sampled, trial_id="final")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} exists and is not empty; choose a new folder")

    started = not ray.is_initialized()
    sweep.init_ray(cfg, address)
    try:
        result = ray.train.torch.TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"trial": spec.to_dict(), "threads": max(1, int(cfg.resources.cpus_per_worker))},
            scaling_config=sweep._scaling(cfg),
            run_config=ray.train.RunConfig(
                name=f"final-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=sweep._train_storage(cfg),
                failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
                logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        ).fit()
    finally:
        if started:
            ray.shutdown()
    rows = result.metrics_dataframe.drop_duplicates("stage", keep="last").to_dict("records")
    for m in rows:
        line = ", ".join(f"{k} {m[k]:+.2f}" for k in ("learning", "heldout_change", "counting_bias", "objective") if k in m)
        print(f"[final] stage {int(m['stage'])}/{len(spec.stages)} ({m.get('stage_skill')}): {line}", flush=True)
    if rows and rows[-1].get("failed") == 1:
        raise UserError(f"training stopped: {rows[-1].get('failure_reason')}")
    if log_mlflow:
        _log_run(cfg, spec, sampled, rows, out)
    ckpt = result.checkpoint.path
    history = checkpoint.load_state(ckpt)["history"]
    # The driver builds the full model from the base and the trained tensors: no worker has to hold
    # (or gather) every weight. Saved in the dtype the workers stored frozen weights in.
    gpu = cfg.resources.gpus_per_worker > 0
    dtype = torch.bfloat16 if cfg.train.weight_dtype == "bf16" or (cfg.train.weight_dtype == "auto" and gpu) else None
    checkpoint.to_full_model(ckpt, out, spec.model, dtype=dtype)
    (out / "lmm_ray_metrics.json").write_text(json.dumps({"recipe": sampled, "history": history}, indent=1))
    print(f"[final] saved the trained model to {out} (load it with AutoModelForImageTextToText.from_pretrained)")
    return history


def _log_run(cfg, spec, sampled: dict, rows: list[dict], out: Path) -> None:
    """The final training as a run of the sweep's experiment (tag lmm_ray.role = final), per-stage metrics."""
    from mlflow.entities import Metric

    client = tracking.client(cfg.mlflow_uri)
    exp = tracking.experiment_id(cfg.mlflow_uri, cfg.experiment, str(Path(cfg.sweep_dir) / "mlartifacts"))
    run_id = client.create_run(exp, run_name=f"final-{spec.recipe_name}", tags={
        "lmm_ray.sweep": cfg.name, "lmm_ray.role": "final", "lmm_ray.output": str(out.resolve())}).info.run_id
    tracking._params(client, run_id, {**sampled, **tracking._flat(cfg.public_dict(), "sweep.")})
    for m in rows:
        step = int(m["stage"])
        ms = [Metric(k, float(v), 0, step) for k, v in m.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        client.log_batch(run_id, metrics=ms)
    client.set_terminated(run_id, "FINISHED")
