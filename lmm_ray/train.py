"""A trial: fine-tune the base model through the skill stages with one recipe, evaluating after each.

`run_trial` is the loop itself and knows nothing of Ray; `train_loop_per_worker` is the Ray
Train entry point that wraps it (DDP or FSDP2, checkpoints, `ray.train.report`). The benchmarks
call `run_trial` directly, so the loop measured plainly is the loop Ray runs.

Per stage s: build the stage's training pool, train, evaluate every target and held-out skill on
every rank (each rank its slice; parallel.evaluate_sharded), aggregate with objective.py,
checkpoint the trainable tensors, report.

Precision (`train.weight_dtype`, `train.precision`; "auto" = bf16 on a GPU, fp32 on the CPU):
frozen weights are stored in the weight dtype; trainable weights are fp32 master weights (an
AdamW step is ~1e-5 of a weight, below bf16's resolution), their gradients and AdamW moments fp32
too; forward and backward compute in bf16 (autocast under DDP, FSDP's param_dtype under FSDP).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from lmm_ray import checkpoint, objective, parallel, resolution, stream
from lmm_ray.optim import NonFiniteLoss, amp, train_stage
from lmm_ray.tasks import split_source
from lmm_ray.trial import TrialSpec


# ---------------------------------------------------------------------------------------------
# Data


def _samples(name: str, skill: str | None, source: dict | None, n: int, seed: int, image_size: int):
    """A generated skill's samples (small images in memory: their evaluation prompts are encoded
    once and reused by every stage), or a data source's SamplePlan (references: nothing is decoded
    until a batch needs it; stream.py)."""
    if skill is not None:
        from lmm_ray import skills

        return skills.generate(skill, n, seed=seed, image_size=image_size)
    return stream.source_plan(None, split_source(source)[0], n, seed, image_size)


def eval_samples(spec: TrialSpec) -> tuple[dict, dict, dict]:
    """{name: samples}, {name: "target"|"heldout"} and {name: EvalTask} for every skill a trial evaluates."""
    ev = spec.eval
    out, kinds, tasks = {}, {}, {}
    for st in spec.stages:
        src = st.eval_data if st.data is not None else None
        if st.data is not None and src is None:
            raise ValueError(f"stage {st.name!r} trains on real data but has no eval_data to measure it on")
        out[st.name] = _samples(st.name, st.skill, src, ev.n_per_skill, ev.seed, ev.image_size)
        kinds[st.name], tasks[st.name] = "target", split_source(src)[1]
    for h in spec.heldout:
        if h.lmms_eval:  # lmms-eval loads, prompts and scores its task itself (lmms_backend.py)
            continue
        out[h.name] = _samples(h.name, h.skill, h.data, ev.n_per_skill, ev.seed, ev.image_size)
        kinds[h.name], tasks[h.name] = "heldout", split_source(h.data)[1]
    return out, kinds, tasks


def trial_evaluation(spec: TrialSpec, processor) -> tuple[dict, list]:
    """(every skill the trial evaluates, encoded once with its task's prompt (evaluate.EvalSet);
    the caption prompts of the held-out images for the caption probe)."""
    from lmm_ray import evaluate

    samples, kinds, tasks = eval_samples(spec)
    held = {n: s for n, s in samples.items() if kinds[n] == "heldout"}
    captions = evaluate.caption_encodings(processor, held, spec.eval.caption_probe_n) if spec.eval.caption_probe_n else []
    return evaluate.build_eval_sets(processor, samples, kinds, tasks=tasks), captions


def trial_eval_sets(spec: TrialSpec, processor) -> dict:
    return trial_evaluation(spec, processor)[0]


def evaluate_stage(spec: TrialSpec, model, processor, sets: dict, captions: list, probe_base=None):
    """(report, metrics) of one evaluation: every skill on every rank's slice (parallel.evaluate_sharded)
    and the caption probe (`probe/caption_number_mass`), in the trial's compute dtype. Without a
    `probe_base` (the base model itself) the report's probe is made its own base (KL and bias 0)."""
    from lmm_ray import evaluate, probe

    device = next(model.parameters()).device
    with amp(device, dtypes(spec, device)[1]):
        report = parallel.evaluate_sharded(model, processor, sets, batch_size=spec.eval.batch_size,
                                           max_new_tokens=spec.eval.max_new_tokens, probe_base=probe_base,
                                           num_workers=spec.data.num_workers)
        lmms = {h.name: h.lmms_eval for h in spec.heldout if h.lmms_eval}
        if lmms:  # every rank takes part: lmms-eval shards the documents by rank
            from lmm_ray import lmms_backend

            for name, r in lmms_backend.run_tasks(model, processor, lmms, batch_size=spec.eval.batch_size,
                                                  include_path=spec.eval.lmms_include_path).items():
                report.results[name] = evaluate.SkillResult(
                    skill=name, kind="heldout", acc=r["score"], predictions=[x["prediction"] for x in r["samples"]],
                    scores=[x["score"] for x in r["samples"]], chance=None)
                report.extra_records[name] = [{**x, "metric": f"lmms_eval:{r['task']}/{r['metric']}"} for x in r["samples"]]
        if probe_base is None:
            report.set_probe_base(probe.ProbeBase.from_report(report))
        metrics = report.metrics()
        if captions:
            metrics["probe/caption_number_mass"] = evaluate.caption_probe(
                model, processor, captions, batch_size=spec.eval.batch_size, max_new_tokens=spec.eval.caption_tokens)
    return report, metrics


def stage_pool(spec: TrialSpec, s: int):
    st = spec.stages[s]
    return _samples(st.name, st.skill, st.data, spec.train.n_train, spec.train.seed, spec.eval.image_size)


def stage_inputs(spec: TrialSpec, s: int, processor, model=None):
    """What stage s trains on: a generated pool encoded up front, one processor call per sample
    (a stage draws steps x batch samples from the pool, ~1.9 per sample in the quickstart, and
    encoding on every draw repeated that work), with the model's position ids when it computes
    them from the inputs (data.add_position_ids); a data source's plan stays a plan (stream.py)."""
    from lmm_ray import data

    pool = stage_pool(spec, s)
    if not isinstance(pool, list):
        return pool
    encs = data.encode_train(processor, pool)
    if model is not None:
        data.add_position_ids(model, encs)
    return encs


# Shared by the trials of a sweep: its evaluation sets, caption prompts and encoded stage pools
# are the same for every trial (same skills, seeds and processor), so the base evaluation builds
# them once and writes them to <sweep>/TRIAL_DATA; each trial maps the file (torch.load with
# mmap: concurrent trials share the pages) instead of generating and encoding ~4,000 samples
# (~5 s of a ~60 s quickstart trial). Only generated skills: a data source's plans stream as before.
TRIAL_DATA = "trial_data.pt"


def data_key(spec: TrialSpec) -> str:
    """Everything a trial's evaluation sets and stage pools depend on; a trial uses a shared file
    only if its key is this trial's (a searched `train.n_train` or seed would change it)."""
    import hashlib
    import json

    d = spec.to_dict()
    k = {"model": d["model"], "stages": d["stages"], "heldout": d["heldout"], "eval": d["eval"], "data": d["data"],
         "n_train": spec.train.n_train, "seed": spec.train.seed}
    return hashlib.sha256(json.dumps(k, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_trial_data(spec: TrialSpec, processor, evaluation: tuple | None = None, model=None) -> dict | None:
    """{"key", "sets", "captions", "pools"} of a trial whose skills are all generated; None otherwise."""
    sets, captions = evaluation or trial_evaluation(spec, processor)
    pools = [stage_inputs(spec, s, processor, model) for s in range(len(spec.stages))]
    if not all(isinstance(x, list) for x in [*pools, captions, *(es.encodings for es in sets.values())]):
        return None  # streamed data: nothing small enough to share
    return {"key": data_key(spec), "sets": sets, "captions": captions, "pools": pools}


def save_trial_data(path: str, shared: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(shared, tmp)
    os.replace(tmp, path)  # a reader sees the whole file or none


def load_trial_data(path: str | None, spec: TrialSpec) -> dict | None:
    """The shared data at `path` if it exists and was built for this trial's data; else None."""
    if not path or not os.path.isfile(path):
        return None
    shared = torch.load(path, mmap=True, weights_only=False)
    return shared if shared.get("key") == data_key(spec) else None


# ---------------------------------------------------------------------------------------------
# Precision and placement


def dtypes(spec: TrialSpec, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, compute dtype or None for no casting) of a trial on `device`."""
    gpu = device.type == "cuda"
    weight = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(spec.train.weight_dtype,
                                                                   torch.bfloat16 if gpu else torch.float32)
    compute = torch.bfloat16 if spec.train.precision == "bf16" or (spec.train.precision == "auto" and gpu) else None
    return weight, compute


def load(spec: TrialSpec, device: torch.device | None = None):
    """The base model in the trial's weight dtype and attention implementation, on `device`."""
    from lmm_ray import models

    device = device or torch.device("cpu")
    weight, _ = dtypes(spec, device)
    loaded = models.load_model(spec.model, dtype=weight, attn_implementation=spec.train.attn_implementation)
    resolution.apply(loaded, spec.data.max_pixels, spec.data.min_pixels)
    loaded.model.to(device)
    return loaded


def prepare(spec: TrialSpec, device: torch.device | None = None, loaded=None):
    """Load the base model and apply the trial's recipe. Returns (loaded, model, resolved); the
    trainable parameters are fp32 master weights whatever the weight dtype (see the module docstring)."""
    from lmm_ray import recipes

    loaded = loaded or load(spec, device)
    if spec.train.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, resolved = recipes.apply(loaded.model, loaded.family, spec.recipe)
    parallel.upcast_trainable_(model)
    return loaded, model, resolved


def distribute(spec: TrialSpec, loaded, model, world: int):
    """The module the optimizer steps: the model itself (one worker), DDP, or the model sharded in
    place with FSDP2 (`parallel.shard_model`); with more than one worker wrapped so that a
    non-finite loss on any rank stops every rank at the same step."""
    if world <= 1:
        return model
    if spec.strategy == "fsdp":
        _, compute = dtypes(spec, next(model.parameters()).device)
        parallel.shard_model(model, loaded.family, mp_dtype=compute)
        return SyncNonFinite(model)
    from torch.nn.parallel import DistributedDataParallel

    dev = next(p for p in model.parameters() if p.requires_grad).device
    return SyncNonFinite(DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None))


class StageStartTeacher:
    """LwF's teacher without a second model: the same (possibly sharded) model, run with the
    trainable tensors it had at the start of the stage swapped in. Costs a copy of the trainable
    tensors (this rank's shards) and one extra forward per micro-batch; a deep copy of the whole
    model would double the weights in memory, which at 7B is what does not fit."""

    def __init__(self, model):
        self.model = model
        self.start = parallel.snapshot_trainable(model)

    def __call__(self, **batch):
        params = dict(parallel.trainable_named(self.model))
        with torch.no_grad():
            local = {n: (p.to_local() if hasattr(p, "to_local") else p) for n, p in params.items()}
            now = {n: t.clone() for n, t in local.items()}
            was_training = self.model.training
            try:
                for n, t in local.items():
                    t.copy_(self.start[n])
                self.model.eval()  # the teacher runs without dropout
                return self.model(**batch)
            finally:
                self.model.train(was_training)
                for n, t in local.items():
                    t.copy_(now[n])


# ---------------------------------------------------------------------------------------------
# Base evaluation: computed once per sweep and shared by every trial


def base_evaluation(spec: TrialSpec, loaded=None, evaluation: tuple | None = None):
    """(stage-0 metrics, ProbeBase, prediction records) of the untuned model: what every trial of a
    sweep shares. Under torch.distributed every rank must call it (each evaluates its slice)."""
    from lmm_ray import evaluate, probe

    loaded = loaded or load(spec)
    sets, captions = evaluation or trial_evaluation(spec, loaded.processor)
    report, metrics = evaluate_stage(spec, loaded.model, loaded.processor, sets, captions)
    return metrics, probe.ProbeBase.from_report(report), evaluate.prediction_records(report, sets)


def pack_base(metrics: dict, probe_base, predictions: dict | None = None) -> dict:
    """The base evaluation as plain data, to hand to Ray workers on any node."""
    with tempfile.TemporaryDirectory() as d:
        probe_base.save(Path(d) / "probe_base.pt")
        return {"metrics": metrics, "probe": (Path(d) / "probe_base.pt").read_bytes(), "predictions": predictions or {}}


def unpack_base(packed: dict):
    """(metrics, ProbeBase, prediction records) of a packed base evaluation."""
    from lmm_ray import probe

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "probe_base.pt").write_bytes(packed["probe"])
        return packed["metrics"], probe.ProbeBase.load(Path(d) / "probe_base.pt"), packed.get("predictions") or {}


def write_predictions(spec: TrialSpec, stage: int, records: dict[str, list[dict]]) -> None:
    """<predictions_dir>/stage<s>/<skill>.jsonl (stage 0 = the base): what `lmm-ray score` reads."""
    if not spec.predictions_dir or not records:
        return
    import json

    from lmm_ray.results import Store

    store = Store(spec.predictions_dir)
    for skill, rows in records.items():
        store.write_text(f"stage{stage}/{skill}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# The loop

Report = Callable[[dict, "str | None"], None]  # (metrics, checkpoint dir or None)


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
    train_model=None,
    ckpt_root: str | None = None,
    shared: dict | None = None,
) -> list[dict]:
    """Run (or resume) every stage; call `report(metrics, ckpt_dir)` after each. Returns the history.

    `train_model` is what `distribute` returned (DDP / FSDP); every rank runs this same function,
    evaluates its slice, and gets the same history. Only rank 0 writes checkpoints. `shared`: the
    sweep's evaluation sets and stage pools (build_trial_data), instead of building them here."""
    if model is None:
        loaded, model, resolved = prepare(spec)
    train_model = train_model or model
    tr, rspec = spec.train, spec.recipe
    if shared is not None and shared["key"] != data_key(spec):
        raise ValueError("run_trial: the shared trial data was built for other skills, seeds or sizes")
    sets, captions = (shared["sets"], shared["captions"]) if shared else trial_evaluation(spec, loaded.processor)
    if base is None:  # a plain run: evaluate the base here (the recipe has not changed any weight yet)
        base = base_evaluation(spec, loaded=loaded, evaluation=(sets, captions))
    base_metrics, probe_base, base_predictions = base
    history: list[dict] = [base_metrics]
    start = 0
    if restore_dir:
        parallel.load_trainable_state(model, checkpoint.load_tensors(restore_dir))
        state = checkpoint.load_state(restore_dir)
        history, start = state["history"], state["stage"]
    elif rank == 0:
        write_predictions(spec, 0, base_predictions)
    fixed = {"trainable": resolved.trainable, "total_params": resolved.total, "trainable_share": resolved.share,
             **{f"roles/{r}": n for r, n in resolved.by_role.items()}}
    pad_id = loaded.tokenizer.pad_token_id
    if start >= len(spec.stages):  # restarted after the last checkpoint: report the final result again
        report(_stage_metrics(spec, history, fixed, {}), None)
        return history

    for s in range(start, len(spec.stages)):
        # references (a plan) or encoded generated samples; batches come from the loader
        pool = shared["pools"][s] if shared else stage_inputs(spec, s, loaded.processor, loaded.model)
        steps = spec.stage_steps(s, len(pool))
        batches = stream.stage_loader(
            pool, loaded.processor, pad_id=pad_id, steps=steps, batch_size=tr.batch_size, seed=tr.seed, stage=s + 1,
            grad_accum=tr.grad_accum, rank=rank, world_size=world_size, num_workers=spec.data.num_workers,
            pin_memory=torch.cuda.is_available())
        teacher = StageStartTeacher(model) if rspec.lwf else None
        prev = parallel.snapshot_trainable(model) if rspec.wise_ft else None
        try:
            stats = train_stage(
                train_model, pool, steps=steps, lr=spec.lr, batch_size=tr.batch_size, grad_accum=tr.grad_accum,
                weight_decay=tr.weight_decay, warmup_ratio=tr.warmup_ratio, max_grad_norm=tr.max_grad_norm,
                precision=tr.precision, pad_id=pad_id, seed=tr.seed, stage=s + 1, rank=rank,
                world_size=world_size, teacher=teacher, lwf=rspec.lwf, batches=batches,
            )
        except NonFiniteLoss as e:
            # Stop this trial with its reason; the sweep goes on.
            report({**_stage_metrics(spec, history, fixed, {}), "failed": 1, "failure_reason": str(e)}, None)
            return history
        if prev is not None:
            parallel.wise_ft_(model, prev, float(rspec.wise_ft.get("alpha", 0.5)))
        del teacher, prev
        result, stage_metrics = evaluate_stage(spec, model, loaded.processor, sets, captions, probe_base)
        history.append(stage_metrics)
        if rank == 0:
            from lmm_ray.evaluate import prediction_records

            write_predictions(spec, s + 1, prediction_records(result, sets))
        extra = {"train_loss_first": stats.loss_first, "train_loss_last": stats.loss_last,
                 "stage_train_seconds": stats.seconds, "stage_steps": stats.steps}
        metrics = _stage_metrics(spec, history, fixed, extra)
        state = {"stage": s + 1, "history": history, "recipe_name": spec.recipe_name, "recipe": spec.recipe.to_dict(),
                 "model": spec.model, "trial_id": spec.trial_id, "lr": spec.lr}
        tensors = parallel.full_trainable_state(model)  # a collective under FSDP: every rank takes part
        if rank == 0:
            with tempfile.TemporaryDirectory(dir=ckpt_root) as d:
                checkpoint.save(d, model, state, tensors=tensors)
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
    else:  # a trial that failed in stage 1 still reports every aggregate (NaN): Tune requires the metric
        out.update({k: float("nan") for k in objective.AGGREGATES})
    out["stages_total"] = len(spec.stages)
    return out


# ---------------------------------------------------------------------------------------------
# Ray Train entry points


class SyncNonFinite(torch.nn.Module):
    """Wraps a DDP or FSDP model so that a loss that is non-finite on any rank is non-finite on every rank.

    `train_stage` stops a trial when its loss is NaN/inf, before `backward`. The ranks see
    different slices of a batch, so one rank can overflow while the others do not: the finite ranks
    would then wait forever in backward's gradient collectives (and the report barrier) for the rank
    that stopped. With this wrapper every rank raises NonFiniteLoss at the same step and reports the
    failure once. Costs one 1-element all-reduce per micro-batch.
    """

    def __init__(self, ddp):
        super().__init__()
        self.ddp = ddp

    @property
    def module(self):  # what checkpoint.unwrap and callers of a DDP model expect
        return getattr(self.ddp, "module", self.ddp)

    def forward(self, *args, **kwargs):
        import torch.distributed as dist

        out = self.ddp(*args, **kwargs)
        if out.loss is not None:
            ok = torch.isfinite(out.loss.detach()).to(torch.float32).reshape(1)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if ok.item() < 1 and torch.isfinite(out.loss.detach()):
                out.loss = out.loss * float("nan")  # another rank's loss is not finite
        return out


def _worker_setup(config: dict):
    import ray.train
    import ray.train.torch

    spec = TrialSpec.from_dict(config["trial"])
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(config.get("threads", os.cpu_count() or 1))))
    return spec, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def train_loop_per_worker(config: dict) -> None:
    """Runs in every Ray Train worker of a trial. `config["trial"]` is a TrialSpec dict."""
    import ray.train

    spec, rank, world, device = _worker_setup(config)
    loaded, model, resolved = prepare(spec, device)
    train_model = distribute(spec, loaded, model, world)
    ckpt = ray.train.get_checkpoint()
    base = unpack_base(config["base_eval"]) if config.get("base_eval") else None
    shared = load_trial_data(config.get("trial_data"), spec)

    def report(metrics: dict, ckpt_dir: str | None) -> None:
        ck = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ck)

    kw = dict(loaded=loaded, model=model, resolved=resolved, base=base, rank=rank, world_size=world, train_model=train_model,
              shared=shared)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            run_trial(spec, report, restore_dir=d, **kw)
    else:
        run_trial(spec, report, **kw)


BASE_FILE = "base_eval.json"


def base_loop_per_worker(config: dict) -> None:
    """The sweep's base evaluation with a trial's resources: every worker loads the base model
    (sharded like a trial under FSDP) and evaluates its slice; rank 0 reports the packed result as
    a checkpoint holding `base_eval.json`."""
    import json

    import ray.train

    spec, rank, world, device = _worker_setup(config)
    loaded = load(spec, device)
    if world > 1 and spec.strategy == "fsdp":
        parallel.shard_model(loaded.model, loaded.family, mp_dtype=dtypes(spec, device)[1])
    evaluation = trial_evaluation(spec, loaded.processor)
    packed = pack_base(*base_evaluation(spec, loaded=loaded, evaluation=evaluation))
    if rank == 0 and config.get("trial_data"):
        shared = build_trial_data(spec, loaded.processor, evaluation, loaded.model)
        if shared is not None:
            save_trial_data(config["trial_data"], shared)
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / BASE_FILE).write_text(json.dumps({**packed, "probe": packed["probe"].hex()}))
            ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"done": 1})
