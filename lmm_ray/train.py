"""A trial: fine-tune the base model through the skill stages with one recipe, evaluating after each.

`run_trial` is the loop itself and knows nothing of Ray; `train_loop_per_worker` is the Ray
Train entry point that wraps it (DDP, checkpoints, `ray.train.report`). `lmm-ray train` and the
benchmarks call `run_trial` directly, so the loop measured plainly is the loop Ray runs.

Per stage s: build the stage's training pool, train, evaluate every target and held-out skill
(the probe reads the same logits), aggregate with objective.py, checkpoint, report.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from lmm_ray import checkpoint, data, objective
from lmm_ray.optim import NonFiniteLoss, train_stage
from lmm_ray.trial import TrialSpec


# ---------------------------------------------------------------------------------------------
# Data


def _samples(name: str, skill: str | None, source: dict | None, n: int, seed: int, image_size: int):
    from lmm_ray import skills
    from lmm_ray.skills.loaders import load_samples

    if skill is not None:
        return skills.generate(skill, n, seed=seed, image_size=image_size)
    return load_samples(source, seed=seed)


def eval_samples(spec: TrialSpec) -> tuple[dict, dict]:
    """{name: samples} and {name: "target"|"heldout"} for every skill a trial evaluates."""
    ev = spec.eval
    out, kinds = {}, {}
    for st in spec.stages:
        src = st.eval_data if st.data is not None else None
        if st.data is not None and src is None:
            raise ValueError(f"stage {st.name!r} trains on real data but has no eval_data to measure it on")
        out[st.name] = _samples(st.name, st.skill, src, ev.n_per_skill, ev.seed, ev.image_size)
        kinds[st.name] = "target"
    for h in spec.heldout:
        out[h.name] = _samples(h.name, h.skill, h.data, ev.n_per_skill, ev.seed, ev.image_size)
        kinds[h.name] = "heldout"
    return out, kinds


def stage_pool(spec: TrialSpec, s: int):
    st = spec.stages[s]
    return _samples(st.name, st.skill, st.data, spec.train.n_train, spec.train.seed, spec.eval.image_size)


# ---------------------------------------------------------------------------------------------
# Base evaluation: computed once per sweep and shared by every trial


def base_evaluation(spec: TrialSpec, loaded=None, eval_sets=None):
    """(stage-0 metrics, ProbeBase) of the untuned model: what every trial of a sweep shares."""
    from lmm_ray import evaluate, models, probe

    loaded = loaded or models.load_model(spec.model)
    if eval_sets is None:
        samples, kinds = eval_samples(spec)
        eval_sets = evaluate.build_eval_sets(loaded.processor, samples, kinds)
    report = evaluate.evaluate(loaded.model, loaded.processor, eval_sets, batch_size=spec.eval.batch_size,
                               max_new_tokens=spec.eval.max_new_tokens)
    probe_base = probe.ProbeBase.from_report(report)
    report.set_probe_base(probe_base)  # stage 0 gets the same keys as later stages (KL and bias 0)
    return report.metrics(), probe_base


def pack_base(metrics: dict, probe_base) -> dict:
    """The base evaluation as plain data, to hand to Ray workers on any node."""
    with tempfile.TemporaryDirectory() as d:
        probe_base.save(Path(d) / "probe_base.pt")
        return {"metrics": metrics, "probe": (Path(d) / "probe_base.pt").read_bytes()}


def unpack_base(packed: dict):
    from lmm_ray import probe

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "probe_base.pt").write_bytes(packed["probe"])
        return packed["metrics"], probe.ProbeBase.load(Path(d) / "probe_base.pt")


# ---------------------------------------------------------------------------------------------
# The loop

Report = Callable[[dict, "str | None"], None]  # (metrics, checkpoint dir or None)


def prepare(spec: TrialSpec, device: torch.device | None = None):
    """Load the base model and apply the trial's recipe. Returns (loaded, model, resolved)."""
    from lmm_ray import models, recipes

    loaded = models.load_model(spec.model)
    if spec.train.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable()
    model, resolved = recipes.apply(loaded.model, loaded.family, spec.recipe)
    if device is not None:
        model.to(device)
    return loaded, model, resolved


def run_trial(
    spec: TrialSpec,
    report: Report,
    *,
    loaded=None,
    model=None,
    resolved=None,
    restore_dir: str | None = None,
    base: tuple | None = None,
    rank: int = 0,
    world_size: int = 1,
    ddp_model=None,
    ckpt_root: str | None = None,
) -> list[dict]:
    """Run (or resume) every stage; call `report(metrics, ckpt_dir)` after each. Returns the history."""
    from lmm_ray import evaluate

    if model is None:
        loaded, model, resolved = prepare(spec)
    train_model = ddp_model or model
    tr, ev, rspec = spec.train, spec.eval, spec.recipe
    samples, kinds = eval_samples(spec)
    eval_sets = evaluate.build_eval_sets(loaded.processor, samples, kinds)
    if base is None:  # a plain run: evaluate the base here (the recipe has not changed any weight yet)
        base = base_evaluation(spec, loaded=loaded, eval_sets=eval_sets)
    base_metrics, probe_base = base
    history: list[dict] = [base_metrics]
    start = 0
    if restore_dir:
        state = checkpoint.restore(restore_dir, model)
        history, start = state["history"], state["stage"]
    fixed = {"trainable": resolved.trainable, "total_params": resolved.total, "trainable_share": resolved.share,
             **{f"roles/{r}": n for r, n in resolved.by_role.items()}}
    pad_id = loaded.tokenizer.pad_token_id
    if start >= len(spec.stages):  # restarted after the last checkpoint: report the final result again
        report(_stage_metrics(spec, history, fixed, {}), None)
        return history

    for s in range(start, len(spec.stages)):
        pool = data.encode_train(loaded.processor, stage_pool(spec, s))
        steps = spec.stage_steps(s, len(pool))
        teacher = copy.deepcopy(model).eval() if rspec.lwf else None
        prev = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if rspec.wise_ft else None
        try:
            stats = train_stage(
                train_model, pool, steps=steps, lr=spec.lr, batch_size=tr.batch_size, grad_accum=tr.grad_accum,
                weight_decay=tr.weight_decay, warmup_ratio=tr.warmup_ratio, max_grad_norm=tr.max_grad_norm,
                precision=tr.precision, pad_id=pad_id, seed=tr.seed, stage=s + 1, rank=rank,
                world_size=world_size, teacher=teacher, lwf=rspec.lwf,
            )
        except NonFiniteLoss as e:
            # Stop this trial with its reason; the sweep goes on.
            report({**_stage_metrics(spec, history, fixed, {}), "failed": 1, "failure_reason": str(e)}, None)
            return history
        if prev is not None:
            alpha = float(rspec.wise_ft.get("alpha", 0.5))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in prev:
                        p.mul_(1 - alpha).add_(prev[n], alpha=alpha)
        del teacher, prev
        if rank == 0:
            result = evaluate.evaluate(model, loaded.processor, eval_sets, batch_size=ev.batch_size,
                                       max_new_tokens=ev.max_new_tokens, probe_base=probe_base)
            history.append(result.metrics())
        else:  # only rank 0's report reaches Tune: the other ranks skip the evaluation
            history.append(history[-1])
        extra = {"train_loss_first": stats.loss_first, "train_loss_last": stats.loss_last,
                 "stage_train_seconds": stats.seconds, "stage_steps": stats.steps}
        metrics = _stage_metrics(spec, history, fixed, extra)
        state = {"stage": s + 1, "history": history, "recipe_name": spec.recipe_name, "recipe": spec.recipe.to_dict(),
                 "model": spec.model, "trial_id": spec.trial_id, "lr": spec.lr}
        if rank == 0:
            with tempfile.TemporaryDirectory(dir=ckpt_root) as d:
                checkpoint.save(d, model, state)
                report(metrics, d)
        else:
            report(metrics, None)
    return history


def _stage_metrics(spec: TrialSpec, history: list[dict], fixed: dict, extra: dict) -> dict:
    s = len(history) - 1
    out = {"stage": s, "timesteps_total": s, **fixed, **extra, **history[-1]}
    out["stage_skill"] = spec.stages[s - 1].name if s else ""
    if s >= 1:
        out.update(objective.aggregate(history, spec.targets[:s], spec.lam, spec.mu))
    out["stages_total"] = len(spec.stages)
    return out


# ---------------------------------------------------------------------------------------------
# Ray Train entry point


class SyncNonFinite(torch.nn.Module):
    """Wraps a DDP model so that a loss that is non-finite on any rank is non-finite on every rank.

    `train_stage` stops a trial when its loss is NaN/inf, before `backward`. Under DDP the ranks see
    different slices of a batch, so one rank can overflow while the others do not: the finite ranks
    would then wait forever in backward's gradient all-reduce (and the report barrier) for the rank
    that stopped. With this wrapper every rank raises NonFiniteLoss at the same step and reports the
    failure once. Costs one 1-element all-reduce per micro-batch.
    """

    def __init__(self, ddp):
        super().__init__()
        self.ddp = ddp

    @property
    def module(self):  # what checkpoint.unwrap and callers of a DDP model expect
        return self.ddp.module

    def forward(self, *args, **kwargs):
        import torch.distributed as dist

        out = self.ddp(*args, **kwargs)
        if out.loss is not None:
            ok = torch.isfinite(out.loss.detach()).to(torch.float32).reshape(1)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if ok.item() < 1 and torch.isfinite(out.loss.detach()):
                out.loss = out.loss * float("nan")  # another rank's loss is not finite
        return out


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker. `config["trial"]` is a TrialSpec dict."""
    import ray.train
    import ray.train.torch

    spec = TrialSpec.from_dict(config["trial"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", os.cpu_count() or 1))))
    device = ray.train.torch.get_device()
    loaded, model, resolved = prepare(spec, device)
    ddp_model = None
    if world > 1:
        ddp_model = SyncNonFinite(
            ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy=config.get("strategy", "ddp")))
    ckpt = ray.train.get_checkpoint()
    base = unpack_base(config["base_eval"]) if config.get("base_eval") else None

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ck = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ck)

    if ckpt is not None:
        with ckpt.as_directory() as d:
            run_trial(spec, report, loaded=loaded, model=model, resolved=resolved, restore_dir=d, base=base,
                      rank=rank, world_size=world, ddp_model=ddp_model)
    else:
        run_trial(spec, report, loaded=loaded, model=model, resolved=resolved, base=base, rank=rank,
                  world_size=world, ddp_model=ddp_model)
