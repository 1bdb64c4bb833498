"""Train the chosen recipe: one configuration through every stage, without Tune, saved as a full model.

The choice file is what `lmm-ray pareto --export` writes (plain values: recipe, lr, ...), so
the run is exactly one trial of the sweep, with the same stages, data and evaluation. The output
folder is a `save_pretrained` folder (model, tokenizer, processor) that transformers loads like
any checkpoint, plus `lmm_ray_metrics.json` (the per-stage history); per-stage metrics also go to
the sweep's MLflow experiment as a run tagged `lmm_ray.role = final`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from lmm_ray import tracking
from lmm_ray.config import load_sweep
from lmm_ray.errors import UserError
from lmm_ray.space import load_search_space


def train_choice(sweep_file: str, choice_file: str, output: str, overrides=(), log_mlflow: bool = True) -> list[dict]:
    from lmm_ray import checkpoint
    from lmm_ray.train import prepare, run_trial
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

    run_id = None
    client = None
    if log_mlflow:
        client = tracking.client(cfg.mlflow_uri)
        exp = tracking.experiment_id(cfg.mlflow_uri, cfg.experiment, str(Path(cfg.sweep_dir) / "mlartifacts"))
        run_id = client.create_run(exp, run_name=f"final-{spec.recipe_name}", tags={
            "lmm_ray.sweep": cfg.name, "lmm_ray.role": "final", "lmm_ray.output": str(out.resolve())}).info.run_id
        tracking._params(client, run_id, {**{k: v for k, v in sampled.items()}, **tracking._flat(cfg.to_dict(), "sweep.")})

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        line = ", ".join(f"{k} {metrics[k]:+.2f}" for k in ("learning", "heldout_change", "counting_bias", "objective") if k in metrics)
        print(f"[final] stage {metrics['stage']}/{len(spec.stages)} ({metrics.get('stage_skill')}): {line}", flush=True)
        if client is not None:
            from mlflow.entities import Metric

            step = int(metrics["stage"])
            ms = [Metric(k, float(v), 0, step) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            client.log_batch(run_id, metrics=ms)
        if metrics.get("failed"):
            raise UserError(f"training stopped: {metrics.get('failure_reason')}")

    loaded, model, resolved = prepare(spec)
    history = run_trial(spec, report, loaded=loaded, model=model, resolved=resolved)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_full_model(loaded, model, out)
    (out / "lmm_ray_metrics.json").write_text(json.dumps({"recipe": sampled, "history": history}, indent=1))
    if client is not None:
        client.set_terminated(run_id, "FINISHED")
    print(f"[final] saved the trained model to {out} (load it with AutoModelForImageTextToText.from_pretrained)")
    return history
