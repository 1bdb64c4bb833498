"""Training throughput per recipe: `optim.train_stage` run plainly vs inside a Ray Train worker.

    python benchmarks/train_throughput.py [--model base:qwen2_5_vl@ci] [--steps 60] [--batch 16]
                                          [--threads 2] [--recipes sa_proj,...] [--json out.json]

The same encoded samples (the `count` skill), batch, steps and torch threads for every recipe and
both modes. Per recipe: (a) plainly in this process, (b) one `TorchTrainer` with 1 worker running the
same code. In both, the model is loaded and the recipe applied outside the timing, then 2 warm-up
steps, then `steps` timed steps; steps/s = steps / time of those steps, measured inside the process
that trains. Ray's fixed cost per trial = `fit()` wall time minus the time spent inside the worker
function (controller and worker start-up, process group, teardown); `ray.init` is reported once.
Modes alternate per recipe so that load from other processes spreads over both.
"""

from __future__ import annotations

import argparse
import os

# Before torch loads (tests/conftest.py sets the same): spin-waiting OpenMP threads on shared cores
# run many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

STUDY_RECIPES = ["sa_proj", "sa_qkv", "mlp", "mlp_gate_up", "mlp_down", "llm", "vision", "projector", "full", "lora"]


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare(model_ref: str, recipe: str, n: int):
    from lmm_ray import data, models, recipes, skills
    from lmm_ray.schema import EvalConfig

    loaded = models.load_model(model_ref)
    model, resolved = recipes.apply(loaded.model, loaded.family, recipe)
    # the image size a trial trains at (train.stage_pool)
    encs = data.encode_train(loaded.processor, skills.generate("count", n, seed=0, image_size=EvalConfig().image_size))
    return loaded, model, resolved, encs


def timed_steps(model_ref: str, recipe: str, steps: int, batch: int, n: int) -> dict:
    """Runs in the process that trains (this one, or a Ray Train worker)."""
    from lmm_ray.optim import train_stage

    t_fn = time.perf_counter()
    loaded, model, resolved, encs = prepare(model_ref, recipe, n)
    kw = dict(lr=1e-4, batch_size=batch, pad_id=loaded.tokenizer.pad_token_id, seed=0, warmup_ratio=0.0)
    train_stage(model, encs, steps=2, stage=0, **kw)  # warm-up: first-call allocations, kernel selection
    t0 = time.perf_counter()
    train_stage(model, encs, steps=steps, stage=1, **kw)
    sec = time.perf_counter() - t0
    return {"trainable": resolved.trainable, "steps_per_s": steps / sec, "train_s": sec,
            "prepare_s": t0 - t_fn, "threads": torch.get_num_threads()}


def ray_worker(config: dict) -> dict:
    import ray.train

    t_in = time.perf_counter()
    torch.set_num_threads(config["threads"])
    out = timed_steps(config["model"], config["recipe"], config["steps"], config["batch"], config["n"])
    out["worker_fn_s"] = time.perf_counter() - t_in
    ray.train.report(dict(out))
    return out  # Train V2 keeps only reports with a checkpoint on the Result; the return value comes back


def run_ray(storage: str, cfg: dict) -> dict:
    import ray.train
    import ray.train.torch

    t0 = time.perf_counter()
    res = ray.train.torch.TorchTrainer(
        ray_worker, train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False),
        run_config=ray.train.RunConfig(storage_path=storage, name=f"tput-{cfg['recipe']}-{int(time.time())}"),
    ).fit()
    wall = time.perf_counter() - t0
    m = res.return_value
    if res.error is not None or m is None:
        raise RuntimeError(f"Ray run for {cfg['recipe']} failed: {res.error}")
    return {**m, "fit_wall_s": wall, "ray_fixed_s": wall - m["worker_fn_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base:qwen2_5_vl@ci")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n", type=int, default=256, help="encoded samples the batches are drawn from")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same in both modes")
    p.add_argument("--recipes", default=",".join(STUDY_RECIPES))
    p.add_argument("--storage", default="/tmp/lmm_ray_train_throughput")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    torch.set_num_threads(a.threads)

    from lmm_ray import base

    if a.model.startswith("base:"):
        base.ensure(a.model)  # build outside any timing
    load_before = load_avg()
    import ray

    from lmm_ray.sweep import worker_env

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), object_store_memory=256 * 2**20, include_dashboard=True,
             runtime_env={"env_vars": worker_env()}, logging_level="WARNING", log_to_driver=False)
    init_s = time.perf_counter() - t0
    print(f"# {a.model}: {a.steps} steps, batch {a.batch}, pool {a.n} 'count' samples, {a.threads} torch threads; "
          f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; ray.init {init_s:.1f}s; load average before: {load_before}",
          flush=True)
    rows = []
    cfg = {"model": a.model, "steps": a.steps, "batch": a.batch, "n": a.n, "threads": a.threads}
    for recipe in recipes:
        plain = timed_steps(a.model, recipe, a.steps, a.batch, a.n)
        r = run_ray(a.storage, {**cfg, "recipe": recipe})
        row = {"recipe": recipe, "trainable": plain["trainable"], "plain_steps_per_s": plain["steps_per_s"],
               "ray_steps_per_s": r["steps_per_s"], "ratio": r["steps_per_s"] / plain["steps_per_s"],
               "ray_fixed_s": r["ray_fixed_s"], "ray_fit_wall_s": r["fit_wall_s"], "load": load_avg()}
        rows.append(row)
        print(f"  {recipe}: plain {row['plain_steps_per_s']:.2f} steps/s, Ray {row['ray_steps_per_s']:.2f} steps/s, "
              f"Ray fixed {row['ray_fixed_s']:.1f}s (load {row['load']})", flush=True)
    ray.shutdown()
    load_after = load_avg()

    print(f"\n| recipe | trainable | plain steps/s | Ray steps/s | ratio Ray/plain | Ray fixed overhead s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['recipe']} | {r['trainable']:,} | {r['plain_steps_per_s']:.2f} | {r['ray_steps_per_s']:.2f} | "
              f"{r['ratio']:.2f} | {r['ray_fixed_s']:.1f} |")
    print(f"\nray.init: {init_s:.1f}s; load average (1/5/15 min) before: {load_before}; after: {load_after}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "ray_init_s": init_s, "load_before": load_before, "load_after": load_after,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
