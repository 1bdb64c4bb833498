"""Streaming input: one processor call per sample, batches > 1 for every family (LLaVA-OneVision's
padded anyres patches included), optim.train_stage's batch order, lazy plans and eval sets."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lmm_ray import data, stream
from lmm_ray.skills import generate
from lmm_ray.skills.loaders import SamplePlan, plan_samples
from lmm_ray.skills.schema import Sample

FAMILIES = ["qwen2_5_vl", "llava_onevision", "internvl", "llava"]
# Square, wide, tall, large: different token counts, and different anyres grids for LLaVA-OV.
SIZES = [(64, 64), (200, 100), (100, 200), (300, 290)]


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr)


def _samples():
    answers = ["5", "a striped cat", "B", "3:45"]
    return [Sample(_image(sz, i), f"question {i}?", a, id=f"s{i}") for i, (sz, a) in enumerate(zip(SIZES, answers))]


def _two_pass(processor, s):
    """The previous encode_train: the image processed twice (prompt alone, prompt + answer)."""
    enc = data._one(processor, data.full_text(processor, s), s.image)
    n_prompt = data._one(processor, data.prompt_text(processor, s), s.image)["input_ids"].shape[1]
    enc["labels"] = enc["input_ids"].clone()
    enc["labels"][:, :n_prompt] = data.IGNORE
    return enc


@pytest.fixture
def ov_grids(tiny_copy):
    """A tiny LLaVA-OneVision with four anyres grids, so images of different aspect ratios get
    different patch counts P_i (the shipped tiny model has one grid: P is always 2)."""
    from lmm_ray.models import Loaded

    src = tiny_copy("llava_onevision")
    grids = [[64, 64], [64, 128], [128, 64], [128, 128]]
    ip = type(src.processor.image_processor)(size={"height": 64, "width": 64}, image_grid_pinpoints=grids)
    proc = type(src.processor)(image_processor=ip, tokenizer=src.processor.tokenizer,
                               chat_template=src.processor.chat_template, num_image_tokens=src.processor.num_image_tokens,
                               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1")
    src.model.config.image_grid_pinpoints = grids
    return Loaded(src.model, proc, src.family, src.ref)


def _loaded(family, tiny, ov_grids):
    return ov_grids if family == "llava_onevision" else tiny(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_processor_call_matches_the_two_pass_encoding(family, tiny, ov_grids, monkeypatch):
    loaded = _loaded(family, tiny, ov_grids)
    calls = []
    real = data._one
    monkeypatch.setattr(data, "_one", lambda p, t, im: calls.append(1) or real(p, t, im))
    for s in _samples():
        calls.clear()
        new = data.encode_train_one(loaded.processor, s)
        assert len(calls) == 1  # the image went through the processor once
        old = _two_pass(loaded.processor, s)
        assert new.keys() == old.keys()
        for k in old:
            assert torch.equal(new[k], old[k]), (family, s.id, k)
        n_label = int((new["labels"] != data.IGNORE).sum())
        answer = loaded.tokenizer.decode(new["labels"][0][new["labels"][0] != data.IGNORE])
        assert n_label >= 2 and answer.startswith(s.answer), answer


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_4_gives_each_sample_its_own_logits(family, tiny, ov_grids):
    """Batch 4, images of 4 aspect ratios, right-padded (training): every sample's logits equal
    its logits alone. For LLaVA-OV this pads pixel_values [1, P_i, 3, H, W] to the largest P."""
    loaded = _loaded(family, tiny, ov_grids)
    model = loaded.model.eval()
    encs = [data.encode_train_one(loaded.processor, s) for s in _samples()]
    if family == "llava_onevision":
        assert len({e["pixel_values"].shape[1] for e in encs}) >= 3  # really different patch counts
    batch = data.collate(encs, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        together = model(**batch).logits
        for i, e in enumerate(encs):
            alone = model(**e).logits[0]
            n = e["input_ids"].shape[1]
            torch.testing.assert_close(together[i, :n], alone, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_prompts_generate_what_each_prompt_generates_alone(family, tiny, ov_grids):
    loaded = _loaded(family, tiny, ov_grids)
    model, pad = loaded.model.eval(), loaded.tokenizer.pad_token_id
    encs = [data.encode_prompt_one(loaded.processor, s) for s in _samples()]
    batch = data.collate(encs, pad, side="left")
    kw = dict(do_sample=False, max_new_tokens=4, pad_token_id=pad)
    with torch.no_grad():
        together = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
        for i, e in enumerate(encs):
            alone = model.generate(**e, **kw)[0, e["input_ids"].shape[1]:]
            assert together[i, :len(alone)].tolist() == alone.tolist(), (family, i)


def test_collate_refuses_per_image_tensors_it_cannot_batch():
    a = {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.zeros(4, 10)}
    b = {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.zeros(4, 12)}
    with pytest.raises(ValueError, match="cannot batch 'pixel_values'"):
        data.collate([a, b], 0)


# ---------------------------------------------------------------------------------------------
# The batch order of optim.train_stage


class _Recorder(list):
    """A pool that records which indices train_stage reads, in order."""

    def __init__(self, items):
        super().__init__(items)
        self.read = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(loss=self.w * input_ids.float().mean(), logits=None)


@pytest.mark.parametrize("batch_size,grad_accum,world", [(8, 1, 1), (8, 2, 2), (12, 3, 4), (6, 4, 1)])
def test_sampler_replays_train_stages_indices_on_every_rank(batch_size, grad_accum, world):
    from lmm_ray.optim import train_stage

    n, steps = 37, 5
    pool = [{"input_ids": torch.full((1, 2), i)} for i in range(n)]
    for rank in range(world):
        rec = _Recorder(pool)
        train_stage(_Toy(), rec, steps=steps, lr=1e-3, batch_size=batch_size, grad_accum=grad_accum, pad_id=0,
                    seed=3, stage=2, rank=rank, world_size=world, precision="fp32")
        sampler = stream.StageBatchSampler(n, steps=steps, batch_size=batch_size, seed=3, stage=2,
                                           grad_accum=grad_accum, rank=rank, world_size=world)
        micro = list(sampler)
        assert len(micro) == len(sampler)
        assert [i for mb in micro for i in mb] == rec.read
        # The loader yields those micro-batches, collated the way train_stage collates them.
        loader = stream.stage_loader(pool, pad_id=0, steps=steps, batch_size=batch_size, seed=3, stage=2,
                                     grad_accum=grad_accum, rank=rank, world_size=world)
        got = [b["input_ids"][:, 0].tolist() for b in loader]
        assert got == micro


def test_ranks_split_the_one_rank_global_batch_and_resume_replays():
    one = list(stream.StageBatchSampler(50, steps=4, batch_size=8, seed=1, stage=1).steps_indices())
    parts = [list(stream.StageBatchSampler(50, steps=4, batch_size=8, seed=1, stage=1, rank=r, world_size=2)
                  .steps_indices()) for r in range(2)]
    assert [a + b for a, b in zip(*parts)] == one  # the global batch of 1 rank, split over 2
    resumed = list(stream.StageBatchSampler(50, steps=4, batch_size=8, seed=1, stage=1, start_step=2).steps_indices())
    assert resumed == one[2:]
    other_stage = list(stream.StageBatchSampler(50, steps=4, batch_size=8, seed=1, stage=2).steps_indices())
    assert other_stage != one


# ---------------------------------------------------------------------------------------------
# Plans and lazy encodings


def _llava_files(tmp_path, n_images=3, n_records=10, size=(96, 64)):
    imgs = tmp_path / "imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    for k in range(n_images):
        _image(size, k).save(imgs / f"{k}.jpg")
    recs = [{"id": f"r{i}", "image": f"{i % n_images}.jpg",
             "conversations": [{"from": "human", "value": f"<image>\nhow many {i}?"}, {"from": "gpt", "value": str(i % 7)}]}
            for i in range(n_records)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    return path, imgs


def test_a_plan_opens_no_image_until_a_sample_is_asked_for(tmp_path, monkeypatch):
    from lmm_ray.skills import loaders

    path, imgs = _llava_files(tmp_path)
    opened = []
    real = loaders._open_image
    monkeypatch.setattr(loaders, "_open_image", lambda p: opened.append(p.id) or real(p))
    plan = plan_samples({"llava_json": str(path), "image_folder": str(imgs)})
    assert len(plan) == 10 and opened == []
    assert plan[4].answer == "4" and plan[4].question == "how many 4?"
    assert len(pickle.dumps(plan)) < 10_000  # references only
    s = plan.sample(4)
    assert opened == ["r4"] and s.image.size == (96, 64)


def test_stage_loader_streams_a_plan_with_workers_like_eager_encoding(tmp_path, tiny):
    loaded = tiny("qwen2_5_vl")
    path, imgs = _llava_files(tmp_path)
    plan = plan_samples({"llava_json": str(path), "image_folder": str(imgs)})
    eager = data.encode_train(loaded.processor, plan.samples())
    lazy = data.encode_train(loaded.processor, plan)
    assert isinstance(lazy, data.LazyEncodings) and len(lazy) == len(eager)
    kw = dict(pad_id=loaded.tokenizer.pad_token_id, steps=3, batch_size=4, seed=0, stage=1, grad_accum=2)
    want = list(stream.stage_loader(eager, **kw))
    for workers in (0, 2):
        got = list(stream.stage_loader(plan, loaded.processor, num_workers=workers, **kw))
        assert len(got) == len(want) == 6
        for g, w in zip(got, want):
            assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)


def test_eval_sets_from_plans_are_lazy_and_score_like_eager_ones(tmp_path, tiny):
    from lmm_ray import evaluate

    loaded = tiny("qwen2_5_vl")
    path, imgs = _llava_files(tmp_path, n_records=7)
    plan = plan_samples({"llava_json": str(path), "image_folder": str(imgs)})
    gen = SamplePlan(generate("color", 5, seed=1), "skill color")
    lazy = evaluate.build_eval_sets(loaded.processor, {"mine": plan, "color": gen}, {"mine": "target", "color": "heldout"})
    eager = evaluate.build_eval_sets(loaded.processor, {"mine": plan.samples(), "color": gen.samples()},
                                     {"mine": "target", "color": "heldout"})
    assert isinstance(lazy["mine"].encodings, data.LazyEncodings)
    for name in lazy:
        a, b = lazy[name], eager[name]
        assert (a.answers, a.prompt_ids, a.chance) == (b.answers, b.prompt_ids, b.chance)
        assert torch.equal(a.gold_first_token, b.gold_first_token) and torch.equal(a.is_number, b.is_number)
    ra = evaluate.evaluate(loaded.model, loaded.processor, lazy, batch_size=3, max_new_tokens=3)
    rb = evaluate.evaluate(loaded.model, loaded.processor, eager, batch_size=3, max_new_tokens=3)
    assert ra.predictions == rb.predictions and ra.metrics() == rb.metrics()
    # Batches from eval_batches are evaluate's batches; select() is a view for sharded evaluation.
    pad = loaded.tokenizer.pad_token_id
    got = list(stream.eval_batches(lazy["mine"].encodings, 3, pad, num_workers=2))
    want = [data.collate(eager["mine"].encodings[i:i + 3], pad, side="left") for i in range(0, 7, 3)]
    assert len(got) == 3 and all(torch.equal(g["input_ids"], w["input_ids"]) for g, w in zip(got, want))
    sub = lazy["mine"].encodings.select([5, 1])
    assert len(sub) == 2 and torch.equal(sub[0]["input_ids"], eager["mine"].encodings[5]["input_ids"])


def test_generated_skills_stay_in_memory_for_every_stage():
    from lmm_ray import config, train, trial

    cfg = config.load_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml")
    spec = trial.trial_spec(cfg, {**cfg.search_space.example(), "lr": 1e-3})
    plans, kinds, _ = train.eval_samples(spec)
    assert set(kinds.values()) == {"target", "heldout"}
    for k in plans:  # generated skills: in-memory samples (encoded once for every stage)
        assert all(s.image is not None for s in plans[k])
    assert len(train.stage_pool(spec, 1)) == cfg.train.n_train


def test_a_trial_on_plans_streams_and_reports_what_the_eager_trial_reports(small_spec, tmp_path, monkeypatch):
    """A trial whose pools and eval sets are plans (streamed: LazyEncodings, or stage_loader once
    train.py is wired to it) reports every metric of the same trial on eagerly loaded Samples, to
    the bit. Holds before and after the integration into train.py."""
    import dataclasses

    from lmm_ray import train
    from lmm_ray.config import StageConfig

    path, imgs = _llava_files(tmp_path, n_records=12)
    src = {"llava_json": str(path), "image_folder": str(imgs)}
    spec = small_spec(stages=1, steps=3, heldout=("color",), train={"grad_accum": 2})
    spec = dataclasses.replace(spec, stages=(*spec.stages, StageConfig("mine", data=src, eval_data=src, steps=3)))

    def run(pool, evals):
        monkeypatch.setattr(train, "stage_pool", pool)
        monkeypatch.setattr(train, "eval_samples", evals)
        out = []
        train.run_trial(spec, lambda m, d: out.append({k: v for k, v in m.items() if k != "stage_train_seconds"}))
        return out

    real_pool, real_evals = train.stage_pool, train.eval_samples

    def eager_evals(sp):
        plans, kinds, tasks = real_evals(sp)
        return {k: p.samples() if hasattr(p, "samples") else p for k, p in plans.items()}, kinds, tasks

    def eager_pool(sp, s):
        p = real_pool(sp, s)
        return p.samples() if hasattr(p, "samples") else p

    eager = run(eager_pool, eager_evals)
    streamed = run(real_pool, real_evals)
    diff = [(i, k, a.get(k), b.get(k)) for i, (a, b) in enumerate(zip(streamed, eager)) for k in set(a) | set(b)
            if a.get(k) != b.get(k) and not (a.get(k) != a.get(k) and b.get(k) != b.get(k))]  # NaN == NaN here
    assert len(streamed) == 2 and not diff, diff
