"""FSDP2 for recipe-applied models: shard per transformer block, gather and scatter the trainable
tensors, shard evaluation over ranks, and WiSE-FT on shards.

Why FSDP2 (`torch.distributed.fsdp.fully_shard`) and not Ray's `prepare_model(parallel_strategy="fsdp")`:
Ray wraps the whole model in FSDP1 with flat parameters, which refuses a model whose parameters
do not all share `requires_grad` - every recipe but `full`. FSDP2 shards each parameter on its
own (a `DTensor` sharded on dim 0), so frozen and trainable parameters can sit in one block.

Precision (`shard_model(..., mp_dtype=torch.bfloat16)`), and why:
- Trainable weights are kept as fp32 shards (`shard_model` upcasts them if the model was loaded in
  bf16). They are the optimizer's master weights: an AdamW step moves a weight by about lr (1e-5 in
  the study), while bf16 resolves only 2^-8 of a weight's value (~1e-4 for a weight of 0.03), so
  most updates to bf16 master weights would round away.
- Frozen weights stay in the dtype they were loaded in (bf16 for the study's checkpoints). They are
  never updated, so nothing is lost, and they are most of the model: this halves the memory.
- Forward and backward run on bf16 copies: FSDP all-gathers every block's shards cast to
  `mp_dtype` (`MixedPrecisionPolicy.param_dtype`), so activations are bf16 as under autocast.
- Gradients are computed in bf16 on the unsharded copies, reduce-scattered in fp32
  (`reduce_dtype`, so the sum over ranks does not round) and kept as fp32 shards, the dtype of
  their parameters, which is what AdamW needs.
- AdamW's two moments are allocated like their parameters: fp32 shards.
With `mp_dtype=None` nothing is cast: every floating parameter must then have one dtype (fp32), as
in the CPU tests, where FSDP and a single process are compared at fp32 precision.

Collectives: `full_trainable_state`, `load_trainable_state`, `checkpoint.restore` of a sharded
model, `evaluate_sharded` and every forward (generation included) must be called by every rank, in
the same order.

Where they are used: train.py (`prepare`, `distribute`, `run_trial`, `StageStartTeacher` for LwF:
an FSDP model cannot be deep-copied, and a second model would double the weights).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lmm_ray.checkpoint import unwrap


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def _is_dtensor(t) -> bool:
    return isinstance(t, _dtensor_cls())


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def hf_model(model) -> nn.Module:
    """The transformers model under any wrapper: peft's `PeftModel` (`get_base_model`) or a DDP-like `.module`."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def block_modules(model, family) -> list[nn.Module]:
    """The transformer blocks FSDP shards one by one: every entry of the family's `blocks` lists."""
    base = hf_model(model)
    if not family.blocks:
        raise ValueError(f"family {family.name!r} does not list its transformer blocks (Family.blocks in families.py), "
                         "so it cannot be sharded; add the dotted paths of its layer ModuleLists")
    out: list[nn.Module] = []
    for path in family.blocks:
        try:
            blocks = base.get_submodule(path)
        except AttributeError:
            raise ValueError(f"family {family.name!r}: the model {type(base).__name__} has no module {path!r} "
                             f"(Family.blocks names {list(family.blocks)}); did transformers rename it?") from None
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"family {family.name!r}: {path!r} is a {type(blocks).__name__}, "
                             "not a non-empty ModuleList of blocks")
        out.extend(blocks)
    return out


def upcast_trainable_(model) -> int:
    """Make every trainable floating parameter fp32 in place (the optimizer's master weights; see the
    module docstring); frozen ones keep their dtype. Assigning `.data` keeps the Parameter objects,
    which peft and any optimizer refer to. `shard_model` calls it; a DDP run on a bf16-loaded model
    should call it after `recipes.apply`. Returns how many parameters it converted."""
    n = 0
    with torch.no_grad():
        for p in unwrap(model).parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
                n += 1
    return n


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(hf_model(model), FSDPModule)


def shard_model(model, family, *, mp_dtype: torch.dtype | None, reshard_after_forward: bool = True, mesh=None):
    """Apply FSDP2 in place: `fully_shard` on every transformer block (LLM decoder layers and vision
    blocks, from `family.blocks`), then on the transformers model as the root (embeddings, head,
    projector, final norms). Call it after `recipes.apply` (LoRA adapters are then inside the blocks)
    and before building the optimizer, which must hold the sharded parameters. The model may be on
    the CPU: with NCCL each block moves to the current GPU as it is sharded. Returns the object it
    was given (a peft model stays the peft model); parameter names do not change.

    The root is the transformers model, not the peft wrapper: peft's forward calls it through
    `__call__`, where FSDP's hooks run. Its `generate` is registered as a forward method too, since
    transformers runs the vision tower and projector (root weights) before the first forward, and
    transformers sees the model as FSDP-managed and turns on `synced_gpus`: a rank whose sequences
    have all ended keeps joining the others' forwards until every rank is done.

    `reshard_after_forward` applies to the blocks (free their gathered weights after forward,
    re-gather for backward: the memory-saving choice); the root keeps its weights gathered from
    forward to backward, which starts with it. Precision: see the module docstring.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model: initialise torch.distributed first (Ray Train does; tests use gloo)")
    base = hf_model(model)
    blocks = block_modules(model, family)
    params = list(base.parameters())
    if any(p.is_meta for p in params):
        raise ValueError("shard_model: the model has parameters on the meta device; load real weights first")
    upcast_trainable_(model)
    if mp_dtype is None:
        dtypes = {p.dtype for p in params if p.is_floating_point()}
        if len(dtypes) > 1:
            raise ValueError(f"shard_model: parameters have dtypes {sorted(map(str, dtypes))} (trainable ones are fp32 "
                             "master weights); without mp_dtype a layer would mix them. Pass mp_dtype=torch.bfloat16, "
                             "or load the model in fp32")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if dist.get_backend() == "nccl" else params[0].device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(base, mesh=mesh, mp_policy=mp)  # root: reshard_after_forward None = kept until backward
    # transformers' generate runs the vision tower and projector (root-group weights) before its first
    # forward call, so generate itself must gather the root's weights, as a forward does.
    register_fsdp_forward_method(base, "generate")
    return model


def reshard(model) -> None:
    """Put every FSDP module back to its sharded state. After a forward without backward (evaluation)
    the root keeps its gathered weights, and its `named_parameters()` are then plain tensors; the
    functions below call this first so they always see the sharded `DTensor`s."""
    from torch.distributed.fsdp import FSDPModule

    for m in hf_model(model).modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def trainable_named(model) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the trainable parameters, named as `checkpoint.trainable_state` names them."""
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Checkpoint tensors: gather (save) and scatter (restore)


def full_trainable_state(model, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The trainable tensors, unsharded, on the CPU, under the names of the unwrapped model's
    `named_parameters()`: the same dict `checkpoint.trainable_state` returns for an unsharded or
    DDP model, so lean checkpoints from DDP and FSDP runs are interchangeable.

    A collective: every rank must call it. Each tensor is all-gathered in turn (one full tensor at
    a time on the device); rank 0 keeps them, the other ranks return {} unless `rank0_only=False`
    (then every rank holds the full copy in host memory). Tensors keep their parameter dtype (fp32
    master weights under `shard_model`). Works unchanged on a model that is not sharded.
    """
    reshard(model)
    rank, _ = _rank_world()
    keep = rank == 0 or not rank0_only
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n, p in trainable_named(model):
            t = p.detach()
            if _is_dtensor(t):
                t = t.full_tensor()
            if keep:
                out[n] = t.to("cpu", copy=True).contiguous()  # a copy even on the CPU: never an alias of a weight
    return out


def load_trainable_state(model, state: Mapping[str, torch.Tensor], *, from_rank0: bool = False) -> None:
    """Copy full (unsharded) trainable tensors into the model, each rank keeping its own shard.

    `from_rank0=False`: every rank passes the full state (e.g. each read the checkpoint file); each
    takes its slice locally, with no communication. `from_rank0=True`: only rank 0's `state` is read
    (the others may pass {}), and each tensor is scattered from rank 0. The parameters are written in
    place, so an optimizer built on them keeps working. The names must be exactly the trainable set
    (as `checkpoint.restore` requires); a mismatch raises on every rank. A collective when sharded.
    """
    from torch.distributed.tensor import distribute_tensor

    reshard(model)
    rank, world = _rank_world()
    params = dict(trainable_named(model))
    error = None
    if not from_rank0 or rank == 0:
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or extra:
            error = (f"load_trainable_state: the state does not match the model's trainable set "
                     f"(missing {missing[:3]}, unexpected {extra[:3]}; recipe mismatch?)")
    if world > 1 and from_rank0:
        box = [error]
        dist.broadcast_object_list(box, src=0)  # so that no rank waits in a scatter the others skip
        error = box[0]
    if error:
        raise ValueError(error)
    with torch.no_grad():
        for n, p in params.items():
            if not _is_dtensor(p):
                p.copy_(state[n].to(p.device, p.dtype))
                continue
            full = state.get(n) if (not from_rank0 or rank == 0) else None
            if full is None:  # a receiving rank: only the shape and dtype matter
                full = torch.empty(p.shape, dtype=p.dtype)
            if tuple(full.shape) != tuple(p.shape):
                raise ValueError(f"load_trainable_state: {n} has shape {tuple(full.shape)}, the model {tuple(p.shape)}")
            full = full.to(device=p.to_local().device, dtype=p.dtype)
            shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=0 if from_rank0 else None)
            p.to_local().copy_(shard.to_local())


# ---------------------------------------------------------------------------------------------
# WiSE-FT on shards


def snapshot_trainable(model) -> dict[str, torch.Tensor]:
    """A copy of this rank's part of every trainable tensor (its local shard when sharded): the
    stage-start weights WiSE-FT interpolates back toward. No communication; 1/world of the memory."""
    reshard(model)
    with torch.no_grad():
        return {n: (p.to_local() if _is_dtensor(p) else p.detach()).clone() for n, p in trainable_named(model)}


def wise_ft_(model, prev: Mapping[str, torch.Tensor], alpha: float) -> None:
    """theta = alpha * theta_prev + (1 - alpha) * theta_tuned, on each rank's shards in place
    (elementwise, so shard by shard equals the unsharded interpolation). `prev` from `snapshot_trainable`."""
    reshard(model)
    with torch.no_grad():
        for n, p in trainable_named(model):
            local = p.to_local() if _is_dtensor(p) else p
            local.mul_(1 - alpha).add_(prev[n].to(local.device, local.dtype), alpha=alpha)


# ---------------------------------------------------------------------------------------------
# Sharded evaluation


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """This rank's items of n, padded so that every rank gets ceil(n / world) of them.

    Under FSDP every rank must join every forward, so every rank must run the same number of
    batches: ranks are given contiguous slices, and a short slice is padded by repeating the last
    item (n - 1). `unpad` drops the padding again.
    """
    if not 0 <= rank < world:
        raise ValueError(f"shard_indices: rank {rank} is outside world {world}")
    if n <= 0:
        return []
    per = math.ceil(n / world)
    real = list(range(rank * per, min(n, (rank + 1) * per)))
    return real + [n - 1] * (per - len(real))


def _n_real(n: int, rank: int, world: int) -> int:
    per = math.ceil(n / world) if n > 0 else 0
    return max(0, min(n, (rank + 1) * per) - rank * per)


def unpad(per_rank: Sequence[Sequence[Any]], n: int) -> list[Any]:
    """Per-rank results of `shard_indices` slices (in rank order) -> the n results in original order."""
    world = len(per_rank)
    out: list[Any] = []
    for r, items in enumerate(per_rank):
        out.extend(list(items)[: _n_real(n, r, world)])
    if len(out) != n:
        raise ValueError(f"unpad: got {len(out)} results for {n} items")
    return out


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (`all_gather_object`; pickled, so keep it small
    or on the CPU). Without a process group: [obj]."""
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def subset_eval_set(es, idx: Sequence[int]):
    """An `evaluate.EvalSet` restricted to the items `idx` (repeats allowed: the padding)."""
    t = torch.tensor(list(idx), dtype=torch.long)
    per_sample = {f.name: [getattr(es, f.name)[i] for i in idx] for f in dataclasses.fields(es)
                  if f.name != "encodings" and isinstance(getattr(es, f.name), list) and len(getattr(es, f.name)) == len(es)}
    # lazy encodings (data.LazyEncodings) stay lazy: each rank processes only its share, per batch
    enc = es.encodings.select(idx) if hasattr(es.encodings, "select") else [es.encodings[i] for i in idx]
    return dataclasses.replace(es, **per_sample, encodings=enc, gold_first_token=es.gold_first_token[t],
                               is_number=es.is_number[t])


def evaluate_sharded(model, processor, eval_sets, *, batch_size: int = 64, max_new_tokens: int = 8,
                     probe_base=None, score_choices: bool = False, num_workers: int = 0):
    """`evaluate.evaluate` with the prompts split over the ranks; every rank must call it and every
    rank gets the complete `EvalReport` (same numbers as one process evaluating everything).

    Each rank evaluates its padded slice of every eval set (`shard_indices`), so all ranks run the
    same number of `generate` calls; inside one call transformers' `synced_gpus` (on for
    FSDP-managed models) keeps ranks whose rows ended early stepping with the others. Predictions,
    scores and first-step logits are then gathered (`gather_objects`), the padding dropped
    (`unpad`), and accuracy and the probe computed on the whole set. Works on a DDP or unsharded
    model too (each rank then evaluates 1/world of the prompts with its own full copy).
    """
    from lmm_ray import evaluate as E

    rank, world = _rank_world()
    if world == 1:
        return E.evaluate(model, processor, eval_sets, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          probe_base=probe_base, score_choices=score_choices, num_workers=num_workers)
    local = {name: subset_eval_set(es, shard_indices(len(es), rank, world)) for name, es in eval_sets.items()}
    # probe_base=None here: the probe compares whole prompt lists, so it is computed after the gather.
    part = E.evaluate(model, processor, local, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      score_choices=score_choices, num_workers=num_workers)
    reshard(model)
    mine = {name: (r.predictions, r.scores, r.first_logits) for name, r in part.results.items()}
    everyone = gather_objects(mine)
    results = {}
    for name, es in eval_sets.items():
        n = len(es)
        preds = unpad([g[name][0] for g in everyone], n)
        scores = unpad([g[name][1] for g in everyone], n)
        first = None
        if es.kind == "heldout":
            first = torch.cat([g[name][2][: _n_real(n, r, world)] for r, g in enumerate(everyone)])
        results[name] = E.skill_result(es, preds, scores, first)
    return E.make_report(results, processor.tokenizer, probe_base)
