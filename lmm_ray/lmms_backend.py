"""lmms-eval (0.7.3) as an in-process evaluation backend: its tasks, prompts and metrics, our model.

`run_tasks(model, processor, {name: lmms-eval task})` evaluates the in-memory model (a plain,
DDP or FSDP2 one) on lmms-eval tasks through `lmms_eval.evaluator.simple_evaluate`, on every rank
at once: lmms-eval gives each rank the documents `rank::world`, our model class generates their
answers, lmms-eval gathers and scores them on rank 0, and rank 0's result is broadcast, so every
rank returns the same dict (docs/architecture.md, "lmms-eval backend").

What lmms-eval decides: the documents (a task's `process_docs`, e.g. `fixed_subset`, is the only
way to take a subset: `limit` would take the first N), the prompt text (`doc_to_text`), the images
(`doc_to_visual`), `max_new_tokens` and the stop strings, and the metric. What we decide: the chat
template (the model family's, the images before the text as lmm_ray's own prompts), greedy decoding
(a task's sampling settings are ignored), and the batching.

lmms-eval's side effects, and what we do about them (shared/research/real_path.md, pitfalls):
- it reseeds random/numpy/torch unless every seed is None: we pass None;
- a rank-0-only call deadlocks (it has barriers and gathers): `run_tasks` is a collective;
- `RANK`/`WORLD_SIZE` are read from the environment: we set them from torch.distributed for the
  call (1 process when no group is initialised) and restore them after;
- `lmms.clean()` deletes every nn.Module attribute of the model object: ours does nothing;
- it monkeypatches filelock's metaclass and `ssl.SSLContext.__reduce__`, and sets loguru to
  WARNING on stdout when `lmms_eval.models` is imported (left as is);
- filelock >= 4 breaks its evaluator (it imports `filelock._api`): `check_tasks` says so.

Install (the `lmms-eval` extra): `pip install -e ".[lmms-eval]"` then
`pip install --no-deps lmms-eval==0.7.3`; scripts/install.sh does both. Without `--no-deps`
lmms-eval pulls torchvision (which changes transformers' image preprocessing), opencv, wandb and
~55 more distributions.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, Iterable, Mapping, Sequence

from lmm_ray.registry import did_you_mean

LMMS_EVAL_VERSION = "0.7.3"
INSTALL_HINT = ('install the lmms-eval extra: pip install -e ".[lmms-eval]" && '
                f"pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION}  (scripts/install.sh does both)")
# A task that sets no max_new_tokens (lmms-eval's own model classes then allow 32,768 tokens).
DEFAULT_MAX_NEW_TOKENS = 128
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class LmmsEvalMissing(ValueError):
    """lmms-eval (or a dependency it needs) cannot be imported; the message says how to install it."""


# ---------------------------------------------------------------------------------------------
# Import, task index, task-name checks


def missing() -> str | None:
    """Why lmms-eval cannot be used here, or None; looks the modules up without importing them
    (cheap: for skip decisions and checks before Ray starts)."""
    import importlib.util

    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    if not found("lmms_eval"):
        return f"lmms-eval is not installed; {INSTALL_HINT}"
    if not found("filelock._api"):  # the evaluator imports it; filelock 4 removed it
        import filelock

        return (f"filelock {getattr(filelock, '__version__', '?')} is installed, but lmms-eval {LMMS_EVAL_VERSION}'s "
                f"evaluator needs filelock<4 (it imports filelock._api); pip install 'filelock<4', or {INSTALL_HINT}")
    return None


@functools.cache
def require():
    """The `lmms_eval.evaluator` module (imported on first use, ~5-20 s with transformers); raises
    LmmsEvalMissing, naming the install command, when lmms-eval or filelock<4 is missing."""
    reason = missing()
    if reason:
        raise LmmsEvalMissing(reason)
    try:
        import lmms_eval.api.model  # noqa: F401
        import lmms_eval.evaluator as evaluator
        import lmms_eval.tasks  # noqa: F401
    except ImportError as e:
        raise LmmsEvalMissing(f"lmms-eval is installed but cannot be imported ({e}); {INSTALL_HINT}") from e
    return evaluator


def available() -> bool:
    """Whether lmms-eval can be used here (`missing()` is None); imports nothing."""
    return missing() is None


def _paths(include_path) -> tuple[str, ...]:
    if include_path is None:
        return ()
    items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    return tuple(os.path.abspath(os.fspath(p)) for p in items)


@functools.cache
def _task_manager(paths: tuple[str, ...]):
    require()
    from lmms_eval.tasks import TaskManager

    for p in paths:
        if not os.path.isdir(p):
            raise ValueError(f"lmms-eval include_path {p!r} is not a folder of task YAML files")
    # Indexing lmms-eval's ~2,000 task files takes 3-12 s: once per process and include_path.
    return TaskManager("WARNING", include_path=list(paths) or None)


def task_manager(include_path=None):
    """lmms-eval's TaskManager over its own tasks plus `include_path` (a folder or a list), cached."""
    return _task_manager(_paths(include_path))


def check_tasks(names: Iterable[str], include_path=None) -> None:
    """Raise ValueError unless every name is one lmms-eval task (not a group or a tag) that the
    installed lmms-eval or `include_path` defines; LmmsEvalMissing (a ValueError) when lmms-eval
    cannot be imported. Messages name the closest task and the install command."""
    names = list(names)
    tm = task_manager(include_path)
    tasks = set(tm.all_subtasks)
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"lmms-eval task names must be non-empty strings, got {n!r}")
        if n in tasks:
            continue
        if n in set(tm.all_groups) | set(tm.all_tags):
            raise ValueError(f"{n!r} is an lmms-eval group or tag, not a task: name one of its tasks "
                             "(each held-out entry reports one score)")
        where = f" or in {', '.join(_paths(include_path))}" if include_path else ""
        raise ValueError(f"unknown lmms-eval task {n!r} (not in lmms-eval {LMMS_EVAL_VERSION}{where})."
                         f"{did_you_mean(n, tasks)}")


def fixed_subset(dataset, sampling: str, seed: int = 0):
    """For a task's `process_docs`: the rows a sampling strategy of skills.loaders keeps
    ("random:500", "first:100", "random:10%", ...), in dataset order. The same rows for every
    trial, stage and rank; lmms-eval's `limit` would take the first N instead.

        # utils.py beside the task YAML (process_docs: !function utils.process_docs)
        def process_docs(ds):
            return fixed_subset(ds, "random:500")
    """
    from lmm_ray.skills.loaders import apply_sampling

    return dataset.select(apply_sampling(range(len(dataset)), sampling, seed))


# ---------------------------------------------------------------------------------------------
# The model class


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _images(visuals, task: str) -> list:
    from PIL import Image

    out = []
    for v in visuals or []:
        if not isinstance(v, Image.Image):
            raise ValueError(f"lmms-eval task {task!r}: doc_to_visual gave a {type(v).__name__}; "
                             "only images are supported (no video or audio)")
        out.append(v if v.mode == "RGB" else v.convert("RGB"))
    return out


def _cut(text: str, until: Sequence[str]) -> str:
    for term in until:
        if term:
            text = text.split(term)[0]
    return text.strip()


def generate(lm, requests) -> list[str]:
    """lmms-eval `generate_until` requests -> answers, by batched greedy decoding in request order.

    Each request's `args` are (context, gen_kwargs, doc_to_visual, doc_id, task, split). Its images
    come from `doc_to_visual(doc)`, its prompt is the family's chat template over
    [system?] + user: [image]*k + [text] ("<image>" marks in the text are removed, as lmms-eval's
    own models do), padded on the left. A batch generates max(max_new_tokens) of its rows and
    each row keeps its own first max_new_tokens (greedy: the same text as generating exactly that
    many), cut at the end-of-turn token and at the first stop string of `until`, then stripped.
    Batches never depend on the task, so every rank (all hold the same number of requests:
    lmms-eval pads them) makes the same number of `generate` calls, as FSDP needs.
    """
    import torch

    from lmm_ray import data
    from lmm_ray.evaluate import _decode, _eos_ids, _to

    model, processor = lm.model, lm.processor
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = _eos_ids(model, tok)
    param = next(model.parameters())
    answers: list[str] = []
    for start in range(0, len(requests), lm.batch_size):
        chunk = requests[start:start + lm.batch_size]
        encs, limits, stops, keys = [], [], [], []
        for r in chunk:
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = r.args
            gen_kwargs = dict(gen_kwargs or {})
            images = _images(doc_to_visual(lm.task_dict[task][split][doc_id]), task)
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": ctx.replace("<image>", "")}]
            msgs = [{"role": "user", "content": content}]
            if lm.system_prompt:
                msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": lm.system_prompt}]})
            prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            encs.append(dict(processor(text=[prompt], images=images or None, return_tensors="pt")))
            until = gen_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            limits.append(int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS))
            keys.append((task, doc_id))
        batch = data.collate(encs, pad_id, side="left")
        prompt_len = batch["input_ids"].shape[1]
        out = model.generate(**_to(batch, param.device, param.dtype), do_sample=False, num_beams=1,
                             max_new_tokens=max(limits), output_logits=lm.keep_first_logits,
                             return_dict_in_generate=True, pad_token_id=pad_id)
        lm.generate_calls += 1
        seqs = out.sequences[:, prompt_len:].cpu()
        for i, (limit, until) in enumerate(zip(limits, stops)):
            answers.append(_cut(_decode(tok, seqs[i:i + 1, :limit], eos)[0], until))
        if lm.keep_first_logits:
            first = out.logits[0].float().cpu()
            for i, key in enumerate(keys):
                lm.first_logits[key] = first[i].clone()
        del out
    if len(answers) != len(requests):
        raise RuntimeError(f"generated {len(answers)} answers for {len(requests)} requests")
    return answers


@functools.cache
def lmm_class():
    """Our subclass of `lmms_eval.api.model.lmms` (built on first use, so that importing this module
    needs no lmms-eval): `lmm_class()(model, processor, batch_size=8)`."""
    require()
    from lmms_eval.api.model import lmms

    class InMemoryLMM(lmms):
        """An in-memory model + processor (`models.Loaded`'s `.model`, `.processor`) as an lmms-eval
        model: `generate_until` only (see `generate`). `first_logits[(task, doc_id)]` holds each
        document's first generated step's logits [V] when `keep_first_logits`."""

        is_simple = True

        def __init__(self, model, processor, *, batch_size: int = 8, system_prompt: str | None = None,
                     keep_first_logits: bool = False):
            super().__init__()
            if int(batch_size) < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
            self.model, self.processor = model, processor
            self.batch_size = int(batch_size)
            self.system_prompt = system_prompt
            self.keep_first_logits = keep_first_logits
            self.first_logits: dict[tuple[str, int], Any] = {}
            self.generate_calls = 0

        @property
        def device(self):
            # torchrun backend: the tensor that counts each rank's requests is all-gathered on this
            # device (the GPU under NCCL, the CPU under gloo).
            return next(self.model.parameters()).device

        def generate_until(self, requests) -> list[str]:
            import torch

            with torch.no_grad():
                return generate(self, requests)

        def loglikelihood(self, requests):
            raise NotImplementedError("lmm_ray's lmms-eval model generates only: use generate_until tasks")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("lmm_ray's lmms-eval model does not run multi-round tasks")

        def clean(self):
            # lmms.clean() deletes every nn.Module attribute and empties the CUDA cache: the model is
            # ours and is trained on after this evaluation.
            pass

    return InMemoryLMM


# ---------------------------------------------------------------------------------------------
# run_tasks


@contextlib.contextmanager
def _dist_env(rank: int, world: int):
    """RANK / WORLD_SIZE (and LOCAL_RANK, if unset) as torch.distributed has them, for lmms-eval,
    which reads them from the environment; restored afterwards."""
    old = {k: os.environ.get(k) for k in ENV_KEYS}
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    if world == 1:
        os.environ["LOCAL_RANK"] = "0"
    else:
        os.environ.setdefault("LOCAL_RANK", str(rank))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first(x):
    while isinstance(x, (list, tuple)) and x:
        x = x[0]
    return x


def _answers(target) -> list[str]:
    if isinstance(target, (list, tuple)):
        return [str(t) for t in target]
    return [] if target is None else [str(target)]


def _number(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _collect(res: Mapping, tasks: Mapping[str, str]) -> dict[str, dict]:
    """Rank 0's simple_evaluate result -> {name: {task, score (pp), metric, n, samples}}."""
    out: dict[str, dict] = {}
    for name, task in tasks.items():
        metric_list = res["configs"][task].get("metric_list") or []
        if not metric_list:
            raise ValueError(f"lmms-eval task {task!r} declares no metric_list")
        metric = metric_list[0]["metric"]
        values = res["results"][task]
        key = f"{metric},none" if f"{metric},none" in values else next(
            (k for k in values if k.startswith(f"{metric},") and "stderr" not in k), None)
        value = values.get(key) if key else None
        if _number(value) is None:
            raise ValueError(f"lmms-eval task {task!r} reported no number for its metric {metric!r} "
                             f"(got {value!r}; keys {sorted(values)})")
        samples = []
        for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]):
            args = s.get("arguments") or [""]
            samples.append({"id": s["doc_id"], "prompt": args[0] if isinstance(args[0], str) else "",
                            "prediction": _first(s.get("filtered_resps")), "answers": _answers(s.get("target")),
                            "score": _number(s.get(metric))})
        out[name] = {"task": task, "score": 100.0 * float(value), "metric": metric, "n": len(samples),
                     "samples": samples}
    return out


def run_tasks(model, processor, tasks: Mapping[str, str], *, batch_size: int = 8, include_path=None,
              system_prompt: str | None = None, keep_first_logits: bool = False) -> dict[str, dict]:
    """Evaluate the model on lmms-eval tasks; a collective: every rank of the process group must call it.

    tasks: {our name: lmms-eval task name}. Returns, on every rank, {our name: {
        "task": the lmms-eval task, "score": its first metric (metric_list[0]) in percentage points,
        "metric": that metric's name, "n": documents scored,
        "samples": [{"id": doc_id, "prompt": the task's text, "prediction": the generated answer
                     after the task's filters, "answers": the target(s) as strings,
                     "score": the document's value of the metric (None if not a number)}],
        "first_logits": Tensor [n, V] in the order of samples (only with keep_first_logits),
        "run_seconds": the wall time of the whole call (all tasks)}}.
    Documents are sharded `rank::world` by lmms-eval and the samples are sorted by id, so the
    result does not depend on the number of ranks. `include_path`: a folder (or list) of extra
    task YAMLs. The model is put in eval mode for the call and restored; under FSDP it is
    resharded afterwards. No global RNG is reseeded.
    """
    import torch
    import torch.distributed as dist

    from lmm_ray import parallel

    if not tasks:
        raise ValueError("run_tasks: no tasks given")
    evaluator = require()
    rank, world = _rank_world()
    tm = task_manager(include_path)
    check_tasks(tasks.values(), include_path)
    lm = lmm_class()(model, processor, batch_size=batch_size, system_prompt=system_prompt,
                     keep_first_logits=keep_first_logits)
    names = list(dict.fromkeys(tasks.values()))
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with _dist_env(rank, world):
            res = evaluator.simple_evaluate(
                model=lm, tasks=names, task_manager=tm, batch_size=batch_size, bootstrap_iters=0,
                log_samples=True, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                fewshot_random_seed=None, distributed_executor_backend="torchrun", verbosity="WARNING",
                process_docs_parallel=1)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    out: Any = None
    if rank == 0:
        try:
            out = _collect(res, tasks)
        except Exception as e:  # every rank must leave the broadcast below, then raise
            out = {"__error__": f"{type(e).__name__}: {e}"}
    if world > 1:
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    if "__error__" in out:
        raise ValueError(f"run_tasks: {out['__error__']}")
    if keep_first_logits:
        merged: dict = {}
        for part in parallel.gather_objects(lm.first_logits):
            merged.update(part)
        for r in out.values():
            r["first_logits"] = torch.stack([merged[(r["task"], s["id"])] for s in r["samples"]]) \
                if r["samples"] else torch.empty(0)
    if world > 1 and parallel.is_sharded(model):
        parallel.reshard(model)
    for r in out.values():
        r["run_seconds"] = seconds
    return out
