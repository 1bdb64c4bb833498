"""One training stage: AdamW, warm-up + cosine learning rate, gradient accumulation and clipping.

Shared by the base-model builder (base.py) and the Ray Train worker loop (train.py). Every
stage draws its batches from a generator seeded by (seed, stage), so a stage that is re-run after
a restart replays exactly the batches of the uninterrupted run, with no RNG state to save.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from lmm_ray.data import collate


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message says at which stage and step."""


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, floor: float = 0.0):
    """Linear warm-up to the peak rate, then cosine decay to `floor` x peak (the study's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stage_generator(seed: int, stage: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + stage)


@dataclass
class StageStats:
    steps: int
    loss_first: float  # mean loss over the first 10% of steps
    loss_last: float  # mean loss over the last 10% of steps
    seconds: float


def amp(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _amp(device: torch.device, precision: str):
    return amp(device, torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def lwf_loss(student_logits, teacher_logits, labels, temperature: float):
    """Distillation toward the stage-start model on the supervised positions (T^2-scaled KL)."""
    mask = labels[:, 1:] != -100  # logits at t predict token t+1
    s = student_logits[:, :-1][mask] / temperature
    t = teacher_logits[:, :-1][mask] / temperature
    return F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True, reduction="batchmean") * temperature**2


def train_stage(
    model,
    encs: Sequence[dict],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int,
    stage: int,
    grad_accum: int = 1,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.03,
    max_grad_norm: float | None = 1.0,
    precision: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    teacher=None,
    lwf: dict | None = None,
    on_step: Callable[[int, float], None] | None = None,
    batches: Iterable[dict] | None = None,
) -> StageStats:
    """Train `steps` optimizer steps on `encs` (encoded samples). `batch_size` is the global batch:
    each of `world_size` ranks takes its own slice of every batch, so 1 or N workers see the same data.
    `batches`: this rank's collated micro-batches in this function's own order (stream.stage_loader
    with the same steps/batch_size/grad_accum/seed/stage/rank/world_size); `encs` is then only sized."""
    import time

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_stage: the model has no trainable parameter")
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, round(warmup_ratio * steps), steps)
    gen = stage_generator(seed, stage)
    torch.manual_seed(1_000_003 * seed + stage)  # dropout (e.g. LoRA) replays too
    per_rank = max(1, batch_size // world_size)
    micro = max(1, per_rank // grad_accum)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    it = iter(batches) if batches is not None else None
    for step in range(steps):
        if it is None:
            idx = torch.randint(len(encs), (per_rank * world_size,), generator=gen)[rank * per_rank : (rank + 1) * per_rank]
        total = 0.0
        for m in range(0, per_rank, micro):
            cpu = next(it) if it is not None else collate([encs[i] for i in idx[m : m + micro].tolist()], pad_id)
            n_m = cpu["input_ids"].shape[0]
            batch = to_device(cpu, device)
            with _amp(device, precision):
                # The teacher runs first: it may swap weights in place (train.StageStartTeacher),
                # which must not happen between the student's forward and its backward.
                t_logits = None
                if teacher is not None and lwf:
                    with torch.no_grad():
                        t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
                out = model(**batch)
                loss = out.loss
                if t_logits is not None:
                    loss = loss + lwf.get("weight", 1.0) * lwf_loss(out.logits, t_logits, batch["labels"], lwf.get("temperature", 2.0))
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss.item()} at stage {stage}, step {step + 1} (lr={lr:g})")
            (loss * n_m / per_rank).backward()
            total += loss.item() * n_m / per_rank
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if on_step:
            on_step(step, total)
    k = max(1, steps // 10)
    return StageStats(steps, sum(losses[:k]) / k, sum(losses[-k:]) / k, time.perf_counter() - t0)
