"""The streaming input pipeline: a stage's training batches and the evaluation batches are read,
decoded, processed and collated one batch at a time, so memory does not grow with the dataset.

    plan = train.stage_pool(spec, s)                  # references: text checked, no image opened
    loader = stream.stage_loader(plan, processor, pad_id=..., steps=..., batch_size=..., seed=...,
                                 stage=s + 1, grad_accum=..., rank=r, world_size=w, num_workers=2)
    for batch in loader: ...                          # micro-batches, in optim.train_stage's order

    plans, kinds, tasks = train.eval_samples(spec)
    sets = evaluate.build_eval_sets(processor, plans, kinds, tasks=tasks)   # EvalSet.encodings: LazyEncodings
    for batch in stream.eval_batches(sets[name].encodings, batch_size, pad_id, num_workers=2): ...

What is held for a whole stage: the plan (a few hundred bytes a sample: text, an image path or a
row number of a memory-mapped dataset) and, in flight, `prefetch` batches per worker. Each image
is decoded and processed once per use, by `data.encode_train_one` (one processor call: the
answer span is found on the text alone).

Batch order. `StageBatchSampler` draws exactly the indices `optim.train_stage` draws: per step,
`torch.randint(n, (per_rank * world,), generator=optim.stage_generator(seed, stage))`, rank r
keeping the slice [r * per_rank, (r + 1) * per_rank), cut into micro-batches of
per_rank // grad_accum. So 1 or N ranks see the same global batch, each rank reads (and decodes)
only its slice, and a stage restarted from its checkpoint (or from `start_step`) replays the same
batches: the generator is re-seeded per stage and advanced once per step, nothing to save.

Why a torch DataLoader and not Ray Data (`ray.train.get_dataset_shard`):
- The order above is the contract (resumed stages, 1 vs N ranks, LwF teachers): a DataLoader
  with a batch sampler gives it exactly; Ray Data's `streaming_split` hands blocks to ranks
  dynamically, so which rank sees which sample, and in what order, is not a function of the seed.
- `lmm-ray train`, the base evaluation, the benchmarks and the tests run without Ray; one code
  path for all of them is the reason `run_trial` knows nothing of Ray.
- Measured (benchmarks/stream_memory.py --ray-data; docs/benchmarks.md, "Streaming input"): the
  same micro-batches (1024x768 JPEGs, tiny Qwen processor, micro-batch 8) went through Ray Data
  (`map` + `iter_rows`, order preserved) at 7.6-19 samples/s after a 5-17 s `ray.init`, against
  18-72 samples/s for the DataLoader in-process and 15-116 with 2 workers (two runs on 2 cores
  shared with other jobs, load 4-9). Ray Data pays off for preprocessing shared by many
  consumers, which one stage of one trial is not.
- `num_workers` defaults to 0: the generated skills' 64 px images are cheap to process in the
  training process, and workers cost a fork per stage. Real images want 2-4 workers per rank (`data.num_workers`; the study sweeps use
  4), so that decoding overlaps the GPU step ("pipeline + train" in the benchmark).
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from lmm_ray import data
from lmm_ray.skills.loaders import SamplePlan, plan_samples
from lmm_ray.skills.schema import Sample


# ---------------------------------------------------------------------------------------------
# Plans: the samples of a trial as references (replace train.stage_pool / train.eval_samples)


def source_plan(skill: str | None, source: dict | None, n: int, seed: int, image_size: int) -> SamplePlan:
    """A generated skill's n samples (drawn now: small images, a sequential random stream), or a
    data source's references (nothing opened; subsets drawn with the source's own seed)."""
    if skill is not None:
        from lmm_ray import skills

        return SamplePlan(skills.generate(skill, n, seed=seed, image_size=image_size), f"skill {skill}")
    return plan_samples(source)


# ---------------------------------------------------------------------------------------------
# Training batches


def micro_batches(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int, int]:
    """(per_rank, micro, micro-batches per step): `optim.train_stage`'s split of a global batch."""
    per_rank = max(1, batch_size // world_size)
    micro = max(1, per_rank // grad_accum)
    return per_rank, micro, math.ceil(per_rank / micro)


class StageBatchSampler(Sampler):
    """This rank's micro-batches of one stage, as lists of pool indices, in training order (see
    the module docstring). Iterating twice gives the same batches."""

    def __init__(self, n: int, *, steps: int, batch_size: int, seed: int, stage: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, start_step: int = 0):
        if n < 1:
            raise ValueError("StageBatchSampler: the pool is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"StageBatchSampler: rank {rank} is outside world {world_size}")
        if not 0 <= start_step <= steps:
            raise ValueError(f"StageBatchSampler: start_step {start_step} is outside 0..{steps}")
        self.n, self.steps, self.seed, self.stage = n, steps, seed, stage
        self.rank, self.world, self.start_step = rank, world_size, start_step
        self.per_rank, self.micro, self.per_step = micro_batches(batch_size, grad_accum, world_size)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.per_step

    def steps_indices(self) -> Iterator[list[int]]:
        """This rank's indices of every step from start_step (per_rank of them)."""
        from lmm_ray.optim import stage_generator  # lazy: optim may come to import this module

        gen = stage_generator(self.seed, self.stage)
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        for step in range(self.steps):
            idx = torch.randint(self.n, (self.per_rank * self.world,), generator=gen)[lo:hi]
            if step >= self.start_step:  # earlier steps are drawn (to advance the generator), not read
                yield idx.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.steps_indices():
            for m in range(0, self.per_rank, self.micro):
                yield idx[m : m + self.micro]


def _dataset(pool, processor, kind: str):
    """A plan (or a list of Samples) becomes LazyEncodings; LazyEncodings and lists of encodings
    are indexed as they are."""
    if isinstance(pool, (list, tuple)) and pool and isinstance(pool[0], Sample):
        pool = SamplePlan(pool)
    if isinstance(pool, SamplePlan):
        if processor is None:
            raise ValueError("a SamplePlan needs the processor to encode it")
        return data.LazyEncodings(pool, processor, kind)
    return pool


def _loader(ds, batch_sampler, pad_id: int, side: str, num_workers: int, pin_memory: bool,
            prefetch: int) -> DataLoader:
    if num_workers and not isinstance(ds, data.LazyEncodings):
        num_workers = 0  # encodings already in memory: workers would only copy them
    return DataLoader(ds, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=functools.partial(data.collate, pad_id=pad_id, side=side),
                      prefetch_factor=prefetch if num_workers else None)


def stage_loader(pool, processor=None, *, pad_id: int, steps: int, batch_size: int, seed: int, stage: int,
                 grad_accum: int = 1, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 start_step: int = 0, pin_memory: bool = False, prefetch: int = 2) -> DataLoader:
    """This rank's collated training micro-batches of one stage, in `optim.train_stage`'s order:
    `steps - start_step` steps of `micro_batches(...)[2]` micro-batches each. `pool`: a
    SamplePlan or a list of Samples (with `processor`), LazyEncodings, or a list of encodings. `num_workers` processes
    decode, process and collate ahead (`prefetch` batches each); 0 does it in this process."""
    ds = _dataset(pool, processor, "train")
    sampler = StageBatchSampler(len(ds), steps=steps, batch_size=batch_size, seed=seed, stage=stage,
                                grad_accum=grad_accum, rank=rank, world_size=world_size, start_step=start_step)
    return _loader(ds, sampler, pad_id, "right", num_workers, pin_memory, prefetch)


# ---------------------------------------------------------------------------------------------
# Evaluation batches


def eval_batches(encodings: Sequence, batch_size: int, pad_id: int, *, side: str = "left", num_workers: int = 0,
                 pin_memory: bool = False, prefetch: int = 2) -> DataLoader:
    """Consecutive batches of an EvalSet's encodings (LazyEncodings or a list), collated with
    `side` padding: the batches `evaluate.evaluate` makes with `data.collate(enc[i:i + bs])`,
    decoded and processed ahead by `num_workers` processes."""
    if batch_size < 1:
        raise ValueError("eval_batches: batch_size must be >= 1")
    n = len(encodings)
    batches = [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
    return _loader(encodings, batches, pad_id, side, num_workers, pin_memory, prefetch)


__all__ = ["StageBatchSampler", "eval_batches", "micro_batches", "source_plan", "stage_loader"]
