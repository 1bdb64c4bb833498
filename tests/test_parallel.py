"""FSDP2 (lmm_ray.parallel) on two CPU processes with gloo, against one unsharded process.

One spawn of 2 ranks (module fixture `sharded`) runs every recipe, the state round trips, WiSE-FT,
generation and the bf16 policy, and saves what it saw; the tests compare that with the same steps
run here without sharding.

Tolerances. Everything runs in fp32 on the CPU, so FSDP and one process differ only by summation
order (the reduce-scatter adds the two ranks' gradients where one process accumulates two
micro-batches; matmuls run on 1 vs 2 threads).
- Gradients (one backward, before any optimizer step): |diff| <= GRAD_RTOL x max|grad|, 1e-5: fp32
  rounding of sums is ~1e-7 relative; measured <= 1e-6.
- Weights after STEPS AdamW steps: AdamW divides each gradient by its own running magnitude, so an
  element whose gradient is near Adam's eps (1e-8) turns a 1e-10 rounding difference into a
  percent of its lr-sized step. Measured over the 4 recipes: 99.99% of elements within 1e-6, the
  worst at 2.2e-5 (2% of lr = 1e-3). Asserted: all within W_TOL = 5% of lr (an error in the
  sharded math, e.g. a gradient not averaged, moves weights by a whole lr), and at most 0.1% beyond 1e-6.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
RECIPES = ("sa_proj", "mlp_gate_up", "full", "lora")
STEPS, BATCH, LR = 3, 4, 1e-3
GRAD_RTOL = 1e-5
W_TOL, W_FINE, W_FINE_SHARE = 0.05 * LR, 1e-6, 1e-3
GEN_TOKENS = 6
GEN_RECIPES = ("sa_proj", "lora")


def _recipe(name: str):
    from lmm_ray import recipes

    spec = recipes.get_recipe(name)
    if spec.lora is not None:
        # No dropout: one process draws the masks of both micro-batches from one stream, two ranks
        # each draw theirs from the same seed, so the masks (and weights) would differ by design.
        spec = dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, dropout=0.0))
    return spec


def _build(recipe: str, dtype=torch.float32):
    from lmm_ray import models, recipes

    loaded = models.build_tiny("qwen2_5_vl")  # seed 0: every rank builds the same weights
    loaded.model.to(dtype)
    model, _ = recipes.apply(loaded.model, loaded.family, _recipe(recipe))
    return loaded, model


def _data(processor):
    from lmm_ray import data, evaluate, skills

    encs = data.encode_train(processor, skills.generate("count", 8, seed=0))
    # 5 and 3 prompts over 2 ranks: both sets need padding.
    samples = {"count": skills.generate("count", 5, seed=evaluate.eval_seed(0)),
               "color": skills.generate("color", 3, seed=evaluate.eval_seed(0))}
    eval_sets = evaluate.build_eval_sets(processor, samples, {"count": "target", "color": "heldout"})
    return encs, eval_sets


def _train(model, encs, pad_id, rank: int, world: int):
    from lmm_ray.optim import train_stage

    # The same global batch either way: world 1 accumulates two micro-batches, which are exactly
    # the two ranks' slices; both then average the two micro-batch losses' gradients.
    return train_stage(model, encs, steps=STEPS, lr=LR, batch_size=BATCH, grad_accum=WORLD // world, pad_id=pad_id,
                       seed=0, stage=1, rank=rank, world_size=world, warmup_ratio=0.0, max_grad_norm=1.0)


def _grads(model, encs, pad_id, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Gradients of one backward on the global batch encs[:4]: each rank its half, or one process both halves."""
    from lmm_ray import data
    from lmm_ray.parallel import trainable_named

    half = BATCH // WORLD
    parts = [rank] if world > 1 else range(WORLD)
    for r in parts:
        loss = model(**data.collate(encs[r * half:(r + 1) * half], pad_id)).loss
        (loss / len(parts)).backward()
    out = {}
    for n, p in trainable_named(model):
        g = p.grad
        out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    model.zero_grad(set_to_none=True)
    return out


def _gen_batch(eval_sets):
    from lmm_ray import data

    return data.collate(eval_sets["count"].encodings[:2], 0, side="left")


def _generate(model, batch, **kw):
    with torch.no_grad():
        return model.generate(**batch, do_sample=False, max_new_tokens=GEN_TOKENS, pad_token_id=0, **kw)


def _worker(rank: int, world: int, tmp: str) -> None:
    from lmm_ray import data, parallel

    torch.set_num_threads(1)
    # A timeout, so that a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from torch.distributed.tensor import DTensor
    try:
        out: dict = {}
        for recipe in RECIPES:
            loaded, model = _build(recipe)
            encs, eval_sets = _data(loaded.processor)
            names = {n: tuple(p.shape) for n, p in parallel.trainable_named(model)}
            parallel.shard_model(model, loaded.family, mp_dtype=None)
            res: dict = {"names": names, "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters())}
            res["grads"] = _grads(model, encs, loaded.tokenizer.pad_token_id, rank, world)
            res["loss"] = _train(model, encs, loaded.tokenizer.pad_token_id, rank, world).loss_last
            state = parallel.full_trainable_state(model, rank0_only=False)
            res["state"] = state
            res["rank0_only_other"] = len(parallel.full_trainable_state(model))  # {} on rank 1
            if recipe == "sa_proj":
                # Round trips: every rank passes the state, then only rank 0 does.
                parallel.load_trainable_state(model, {n: t + 1 for n, t in state.items()})
                res["bumped"] = parallel.full_trainable_state(model)
                prev = parallel.snapshot_trainable(model)  # local shards of state + 1
                parallel.load_trainable_state(model, state if rank == 0 else {}, from_rank0=True)
                res["restored"] = parallel.full_trainable_state(model)
                parallel.wise_ft_(model, prev, 0.25)  # 0.25 (s + 1) + 0.75 s = s + 0.25
                res["wise"] = parallel.full_trainable_state(model)
                try:
                    parallel.load_trainable_state(model, {} if rank == 0 else state, from_rank0=True)
                except ValueError as e:
                    res["mismatch_error"] = str(e)  # raised on both ranks, not only on rank 0
                parallel.load_trainable_state(model, state)
                # Lean checkpoints: gathered by all ranks, written by rank 0, restored by all.
                from lmm_ray import checkpoint

                try:
                    checkpoint.trainable_state(model)
                except ValueError as e:
                    res["ckpt_error"] = str(e)
                if rank == 0:
                    checkpoint.save(f"{tmp}/ckpt", model, {"stage": 1}, tensors=parallel.full_trainable_state(model))
                else:
                    parallel.full_trainable_state(model)
                dist.barrier()
                parallel.load_trainable_state(model, {n: t * 0 for n, t in state.items()})
                res["ckpt_restored_state"] = checkpoint.restore(f"{tmp}/ckpt", model)
                res["ckpt_restored"] = parallel.full_trainable_state(model)
                # LwF's teacher under FSDP (train.StageStartTeacher): the stage-start tensors swapped
                # into the same sharded model give the stage-start logits after the student moved.
                from lmm_ray.train import StageStartTeacher

                probe = data.collate(encs[:2], loaded.tokenizer.pad_token_id)
                cur = parallel.full_trainable_state(model, rank0_only=False)
                model.eval()
                with torch.no_grad():
                    before = model(**probe).logits
                teacher = StageStartTeacher(model)
                parallel.load_trainable_state(model, {n: t + 0.01 for n, t in cur.items()})
                with torch.no_grad():
                    res["teacher_same"] = torch.equal(teacher(**probe).logits, before)
                    res["student_moved"] = not torch.equal(model(**probe).logits, before)
                parallel.load_trainable_state(model, cur)
                del teacher
                # Generation with divergent stops: rank 0 stops after one token (every token is
                # an eos for it) while rank 1 runs all GEN_TOKENS steps.
                batch = _gen_batch(eval_sets)
                if rank == 0:
                    res["tokens_diverge"] = _generate(model, batch, eos_token_id=list(range(len(loaded.tokenizer))))
                else:
                    res["tokens_diverge"] = _generate(model, batch, min_new_tokens=GEN_TOKENS)
            if recipe in GEN_RECIPES:  # generation through peft's wrapper too
                res["tokens_same"] = _generate(model, _gen_batch(eval_sets))
                report = parallel.evaluate_sharded(model, loaded.processor, eval_sets, batch_size=2, max_new_tokens=4)
                res["eval"] = (report.predictions, report.metrics(), report.heldout_first_logits()[0])
            out[recipe] = res
        # Activation checkpointing (recomputes each block inside backward, where FSDP re-gathers it).
        loaded, model = _build("sa_proj")
        model.gradient_checkpointing_enable()
        parallel.shard_model(model, loaded.family, mp_dtype=None)
        model.train()
        out["ckpt_grads"] = _grads(model, _data(loaded.processor)[0], loaded.tokenizer.pad_token_id, rank, world)
        out["bf16"] = _bf16_policy(rank, world)
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _bf16_policy(rank: int, world: int) -> dict:
    """The mixed-precision policy on a bf16-loaded model: what dtype each tensor ends up in."""
    from lmm_ray import data, parallel

    from torch.distributed.tensor import DTensor
    loaded, model = _build("sa_proj", torch.bfloat16)
    out: dict = {}
    try:
        parallel.shard_model(model, loaded.family, mp_dtype=None)
    except ValueError as e:
        out["no_mp_error"] = str(e)
    loaded, model = _build("sa_proj", torch.bfloat16)
    parallel.shard_model(model, loaded.family, mp_dtype=torch.bfloat16)
    encs, _ = _data(loaded.processor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.to_local().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=LR)
    batch = data.collate(encs[rank * 2:rank * 2 + 2], loaded.tokenizer.pad_token_id)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    loss = model(**batch).loss
    loss.backward()
    out["loss_dtype"] = loss.dtype
    out["grad_dtypes"] = {p.grad.dtype for p in trainable}
    out["grads_sharded"] = all(isinstance(p.grad, DTensor) for p in trainable)
    opt.step()
    out["trainable_dtypes"] = {p.dtype for p in trainable}
    out["frozen_dtypes"] = {p.dtype for p in model.parameters() if not p.requires_grad}
    out["adam_dtypes"] = {v.dtype for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")}
    local = [p.to_local() for p in trainable]

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    out["local_bytes"] = {  # what this rank holds, for memory.estimate
        "frozen_weights": nbytes(p.to_local() for p in model.parameters() if not p.requires_grad),
        "trainable_weights": nbytes(local), "gradients": nbytes(p.grad.to_local() for p in trainable),
        "optimizer": nbytes(v.to_local() if isinstance(v, DTensor) else v for st in opt.state.values() for v in st.values()),
    }
    out["moved"] = all(not torch.equal(b, p.to_local()) for b, p in zip(before, trainable) if p.to_local().numel())
    out["loss"] = loss.item()
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """{rank: what that rank saw}."""
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=True)
    return {r: torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)}


@pytest.fixture(scope="module")
def reference():
    """{recipe: (trained unsharded model, loaded, eval sets)} after the same steps in one process."""
    out = {}
    for recipe in RECIPES:
        loaded, model = _build(recipe)
        encs, eval_sets = _data(loaded.processor)
        grads = _grads(model, encs, loaded.tokenizer.pad_token_id, 0, 1)
        _train(model, encs, loaded.tokenizer.pad_token_id, 0, 1)
        out[recipe] = (model, loaded, eval_sets, grads)
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp_training_matches_one_process(sharded, reference, recipe):
    from lmm_ray import checkpoint

    model, _, _, ref_grads = reference[recipe]
    ref = checkpoint.trainable_state(model)
    res = sharded[0][recipe]
    scale = max(g.abs().max().item() for g in ref_grads.values())
    gdiff = max((res["grads"][n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    assert gdiff <= GRAD_RTOL * scale, f"{recipe}: gradients differ by {gdiff:.2e} (max |grad| {scale:.2e})"
    assert res["all_dtensor"], "every parameter (frozen ones too) is sharded"
    # Names and shapes: the unsharded model's trainable set, so DDP and FSDP checkpoints interchange.
    assert set(res["state"]) == set(ref) == set(res["names"])
    assert {n: tuple(t.shape) for n, t in res["state"].items()} == res["names"]
    assert all(t.device.type == "cpu" for t in res["state"].values())
    init = checkpoint.trainable_state(_build(recipe)[1])
    diffs = torch.cat([(res["state"][n] - ref[n]).abs().flatten() for n in ref])
    moved = max((ref[n] - init[n]).abs().max().item() for n in ref)
    assert diffs.max().item() <= W_TOL, f"{recipe}: FSDP vs one process differ by {diffs.max().item():.2e}"
    assert (diffs > W_FINE).float().mean().item() <= W_FINE_SHARE
    assert moved > 0.5 * LR, "the weights did move (the comparison is not vacuous)"
    assert res["loss"] == pytest.approx(sharded[1][recipe]["loss"], rel=0.5)  # each rank its own half
    # rank0_only=False gave rank 1 the same tensors; the default gives it nothing.
    assert all(torch.equal(res["state"][n], sharded[1][recipe]["state"][n]) for n in ref)
    assert sharded[1][recipe]["rank0_only_other"] == 0 and res["rank0_only_other"] == len(ref)


def test_gradient_checkpointing_under_fsdp(sharded, reference):
    ref = reference["sa_proj"][3]
    scale = max(g.abs().max().item() for g in ref.values())
    for n, g in ref.items():
        assert (sharded[0]["ckpt_grads"][n] - g).abs().max().item() <= GRAD_RTOL * scale, n


def test_state_round_trip_and_wise_ft(sharded):
    res = sharded[0]["sa_proj"]
    s = res["state"]
    for n, t in s.items():
        assert torch.equal(res["bumped"][n], t + 1)
        assert torch.equal(res["restored"][n], t)  # scattered from rank 0
        assert torch.allclose(res["wise"][n], t + 0.25, atol=1e-6)
    for r in range(WORLD):
        assert "does not match the model's trainable set" in sharded[r]["sa_proj"]["mismatch_error"]
        assert sharded[r]["sa_proj"]["teacher_same"] and sharded[r]["sa_proj"]["student_moved"]
        assert "full_trainable_state" in sharded[r]["sa_proj"]["ckpt_error"]  # not a hang
        assert sharded[r]["sa_proj"]["ckpt_restored_state"] == {"stage": 1}
    for n, t in s.items():  # checkpoint.save(tensors=...) on rank 0, checkpoint.restore on both
        assert torch.equal(res["ckpt_restored"][n], t)


@pytest.mark.parametrize("recipe", GEN_RECIPES)
def test_generation_matches_unsharded(sharded, reference, recipe):
    from lmm_ray import evaluate

    model, loaded, eval_sets, _ = reference[recipe]
    # The FSDP run's exact weights, so that generation is compared on equal weights.
    fsdp_state = sharded[0][recipe]["state"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in fsdp_state:
                p.copy_(fsdp_state[n])
    model.eval()
    batch = _gen_batch(eval_sets)
    want = _generate(model, batch)
    for r in range(WORLD):  # both ranks, the same prompts
        assert torch.equal(sharded[r][recipe]["tokens_same"], want)
    if recipe == "sa_proj":
        # Divergent stops: rank 0 ended after one token while rank 1 went on; both finished.
        first = _generate(model, batch, eos_token_id=list(range(len(loaded.tokenizer))))
        assert torch.equal(sharded[0][recipe]["tokens_diverge"], first)
        full = _generate(model, batch, min_new_tokens=GEN_TOKENS)
        assert torch.equal(sharded[1][recipe]["tokens_diverge"], full)
        assert full.shape[1] == batch["input_ids"].shape[1] + GEN_TOKENS
    # Sharded evaluation (padded slices, gathered): the whole report, on every rank.
    rep = evaluate.evaluate(model, loaded.processor, eval_sets, batch_size=2, max_new_tokens=4)
    for r in range(WORLD):
        preds, metrics, logits = sharded[r][recipe]["eval"]
        assert preds == rep.predictions
        assert metrics.keys() == rep.metrics().keys()
        for k, v in rep.metrics().items():
            assert metrics[k] == pytest.approx(v, abs=1e-4), k
        assert torch.allclose(logits, rep.heldout_first_logits()[0], atol=1e-4)


def test_bf16_policy(sharded):
    for r in range(WORLD):
        b = sharded[r]["bf16"]
        assert "mp_dtype" in b["no_mp_error"]
        assert b["trainable_dtypes"] == {torch.float32}  # master weights upcast from bf16
        assert b["frozen_dtypes"] == {torch.bfloat16}  # frozen stay as loaded
        assert b["grad_dtypes"] == {torch.float32} and b["grads_sharded"]
        assert b["adam_dtypes"] == {torch.float32}
        assert b["loss_dtype"] == torch.float32 and torch.isfinite(torch.tensor(b["loss"]))
        assert b["moved"]


def test_memory_estimate_is_exact_per_rank(sharded):
    """memory.estimate's FSDP parts are the bytes rank 0 holds (ceil(dim0 / 2) rows of every
    parameter, its gradient and AdamW moments); rank 1 holds at most as much."""
    from lmm_ray import memory

    est = memory.estimate("tiny:qwen2_5_vl", "sa_proj", workers=WORLD, strategy="fsdp", weight_dtype="bf16")
    want = {k: est["parts"][k] for k in sharded[0]["bf16"]["local_bytes"]}
    assert sharded[0]["bf16"]["local_bytes"] == want
    assert all(sharded[1]["bf16"]["local_bytes"][k] <= v for k, v in want.items())


def test_shard_indices_and_unpad():
    from lmm_ray.parallel import shard_indices, unpad

    for n in (0, 1, 2, 5, 7, 8):
        for world in (1, 2, 3, 4):
            parts = [shard_indices(n, r, world) for r in range(world)]
            assert len({len(p) for p in parts}) == 1  # every rank runs the same number of items
            assert unpad(parts, n) == list(range(n))
    assert shard_indices(5, 1, 2) == [3, 4, 4]
    with pytest.raises(ValueError):
        shard_indices(3, 2, 2)


def test_block_modules_and_errors(tiny):
    from lmm_ray import parallel

    for fam in ("qwen2_5_vl", "llava_onevision", "internvl", "llava"):
        t = tiny(fam)
        blocks = parallel.block_modules(t.model, t.family)
        assert len(blocks) == 4 + 2  # tiny: 4 decoder layers, 2 vision blocks
    t = tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="does not list its transformer blocks"):
        parallel.block_modules(t.model, dataclasses.replace(t.family, blocks=()))
    with pytest.raises(ValueError, match="has no module"):
        parallel.block_modules(t.model, dataclasses.replace(t.family, blocks=("model.nope",)))
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed"):
            parallel.shard_model(t.model, t.family, mp_dtype=None)


def test_single_process_fallbacks(tiny_copy):
    """Without sharding (or a process group) the same functions act on plain tensors."""
    from lmm_ray import checkpoint, parallel, recipes

    t = tiny_copy("qwen2_5_vl")
    model, _ = recipes.apply(t.model, t.family, "sa_proj")
    s = parallel.full_trainable_state(model)
    assert s.keys() == checkpoint.trainable_state(model).keys()
    prev = parallel.snapshot_trainable(model)
    parallel.load_trainable_state(model, {n: v * 2 for n, v in s.items()})
    parallel.wise_ft_(model, prev, 0.5)
    for n, v in parallel.full_trainable_state(model).items():
        assert torch.allclose(v, 1.5 * s[n])
    assert parallel.gather_objects(3) == [3]
    with pytest.raises(ValueError, match="trainable set"):
        parallel.load_trainable_state(model, {})
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"  # inherited by the spawned ranks (conftest)
