"""The trial loop without Ray (`train.run_trial`): metrics, frozen weights, lean checkpoints,
full-model export, resume, non-finite losses, LwF and WiSE-FT. Everything on the ci base, a few
steps per stage and 8 eval samples per skill: each trial takes seconds."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from statistics import mean

import pytest
import torch
from safetensors.torch import load_file

from lmm_ray import checkpoint, train
from lmm_ray.checkpoint import STATE, TENSORS

pytestmark = pytest.mark.slow

SA_RE = re.compile(r"model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.(weight|bias)")
# Numbers of the run itself (wall time) that differ between two identical runs.
TIMING = {"stage_train_seconds"}


class Recorder:
    """A `report` callback: keeps every metrics dict and copies each checkpoint folder (the loop
    deletes its temporary folder right after the call)."""

    def __init__(self, out: Path, stop_after: int | None = None):
        self.out, self.stop_after = Path(out), stop_after
        self.metrics: list[dict] = []
        self.ckpts: dict[int, Path] = {}

    def __call__(self, metrics: dict, ckpt_dir: str | None) -> None:
        self.metrics.append(dict(metrics))
        if ckpt_dir is not None:
            dst = self.out / f"stage{metrics['stage']}"
            shutil.copytree(ckpt_dir, dst)
            self.ckpts[metrics["stage"]] = dst
        if self.stop_after is not None and metrics["stage"] >= self.stop_after:
            raise Stop()


class Stop(Exception):
    pass


def run(spec, out: Path, **kw):
    """(recorder, history, model, resolved) of a full plain run, the model kept for inspection."""
    loaded, model, resolved = train.prepare(spec)
    rec = Recorder(out)
    hist = train.run_trial(spec, rec, loaded=loaded, model=model, resolved=resolved, **kw)
    return rec, hist, model, resolved


def base_state() -> dict[str, torch.Tensor]:
    """A freshly loaded base model's weights (independent of any trial's model object)."""
    from lmm_ray import models

    return models.load_model("base:qwen2_5_vl@ci").model.state_dict()


def comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMING}


def assert_same_metrics(a: dict, b: dict, tol: float = 1e-6):
    a, b = comparable(a), comparable(b)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) or isinstance(b[k], float):
            assert math.isclose(a[k], b[k], rel_tol=tol, abs_tol=tol), (k, a[k], b[k])
        else:
            assert a[k] == b[k], (k, a[k], b[k])


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory, ci_base):
    """2-stage sa_proj and llm runs, shared by the metric / weight / checkpoint tests."""
    from lmm_ray import recipes
    from lmm_ray.config import HeldoutConfig, StageConfig
    from lmm_ray.schema import EvalConfig, TrainConfig
    from lmm_ray.trial import TrialSpec

    out = {}
    for rec in ("sa_proj", "llm"):
        spec = TrialSpec(model="base:qwen2_5_vl@ci", recipe=recipes.get_recipe(rec), lr=1e-3,
                         stages=(StageConfig("count", skill="count", steps=4), StageConfig("clock", skill="clock", steps=4)),
                         heldout=(HeldoutConfig("color", skill="color"), HeldoutConfig("shape", skill="shape")),
                         train=TrainConfig(batch_size=8, n_train=64), eval=EvalConfig(n_per_skill=8, batch_size=16),
                         lam=0.7, mu=50.0)
        rec_, hist, model, resolved = run(spec, tmp_path_factory.mktemp(rec))
        out[rec] = dict(spec=spec, rec=rec_, hist=hist, model=model, resolved=resolved)
    return out


# ---------------------------------------------------------------------------------------------
# 1. Metrics after every stage, and the aggregates recomputed by hand


@pytest.mark.parametrize("recipe", ["sa_proj", "llm"])
def test_every_design_metric_after_each_stage_and_aggregates_by_hand(two_stage, recipe):
    r = two_stage[recipe]
    spec, ms = r["spec"], r["rec"].metrics
    assert [m["stage"] for m in ms] == [1, 2]
    assert all(not m.get("failed") for m in ms)
    assert sorted(r["rec"].ckpts) == [1, 2]
    per_stage = ["heldout/mean_acc", "probe/number_mass", "probe/kl_base", "probe/entropy", "probe/heldout_acc_no_numbers"]
    aggregates = ["learning", "target_forgetting", "heldout_change", "heldout_change_final", "heldout_change_worst",
                  "counting_bias", "objective"]
    names = ([f"target/{s}/acc" for s in ("count", "clock")] + [f"heldout/{h}/acc" for h in ("color", "shape")]
             + per_stage + aggregates)
    for m in ms:
        missing = [n for n in names if n not in m]
        assert not missing, f"stage {m['stage']}: missing {missing}"
        assert all(isinstance(m[n], float) and math.isfinite(m[n]) for n in names if n in m), m
        assert m["heldout/mean_acc"] == pytest.approx(mean([m["heldout/color/acc"], m["heldout/shape/acc"]]))
        for n in names:
            if n.endswith("/acc"):  # 8 samples per skill: multiples of 12.5 pp
                assert m[n] in {12.5 * k for k in range(9)}, (n, m[n])
        assert m["trainable"] == r["resolved"].trainable and m["stage_steps"] == 4

    # The base evaluated independently (a fresh model, not the trial's): stage 0. (Float noise ~1e-7
    # only: the trial evaluates its base after the recipe froze parameters, which picks other kernels.)
    b, _, _ = train.base_evaluation(spec)
    assert_same_metrics(b, r["hist"][0])
    b = r["hist"][0]
    t = ["count", "clock"]
    acc = [b] + ms  # acc[s] = metrics after stage s

    def hand(S: int) -> dict:
        learning = sum(acc[s][f"target/{t[s - 1]}/acc"] - b[f"target/{t[s - 1]}/acc"] for s in range(1, S + 1)) / S
        forgetting = (sum(acc[S][f"target/{t[s - 1]}/acc"] - acc[s][f"target/{t[s - 1]}/acc"] for s in range(1, S)) / (S - 1)
                      if S > 1 else 0.0)
        ho = [acc[s]["heldout/mean_acc"] - b["heldout/mean_acc"] for s in range(1, S + 1)]
        bias = sum(acc[s]["probe/number_mass"] - b["probe/number_mass"] for s in range(1, S + 1)) / S
        out = {"learning": learning, "target_forgetting": forgetting, "heldout_change": sum(ho) / S,
               "heldout_change_final": ho[-1], "heldout_change_worst": min(ho), "counting_bias": bias}
        out["objective"] = learning + 0.7 * min(0.0, out["heldout_change"]) - 50.0 * bias
        return out

    for S in (1, 2):
        m = ms[S - 1]
        for k, v in hand(S).items():
            assert m[k] == pytest.approx(v, abs=1e-9), (S, k)
        assert m["probe/number_mass_change"] == pytest.approx(m["probe/number_mass"] - b["probe/number_mass"], abs=1e-9)
        assert m["kl_base"] == m["probe/kl_base"] and m["probe/kl_base"] >= 0
    # the history the loop returns is what it reported
    for s in (1, 2):
        assert {k: ms[s - 1][k] for k in r["hist"][s]} == r["hist"][s]


# ---------------------------------------------------------------------------------------------
# 2. Frozen tensors untouched, trainable ones trained


@pytest.mark.parametrize("recipe", ["sa_proj", "llm"])
def test_frozen_tensors_bit_identical_to_base_trainable_changed(two_stage, recipe):
    r = two_stage[recipe]
    base = base_state()
    trained = {n for n, p in r["model"].named_parameters() if p.requires_grad}
    assert trained == set(r["resolved"].names)
    after = r["model"].state_dict()
    assert after.keys() == base.keys()
    changed_frozen = [n for n in base if n not in trained and not torch.equal(base[n], after[n])]
    assert not changed_frozen, changed_frozen[:5]
    unchanged_trained = [n for n in trained if torch.equal(base[n], after[n])]
    assert not unchanged_trained, unchanged_trained[:5]


# ---------------------------------------------------------------------------------------------
# 3. Lean checkpoints


def test_sa_proj_checkpoint_holds_only_attention_projections_and_scales_with_trainable(two_stage, oracle):
    sa, llm = two_stage["sa_proj"], two_stage["llm"]
    base = base_state()
    for r in (sa, llm):
        for s, d in r["rec"].ckpts.items():
            assert sorted(p.name for p in d.iterdir()) == sorted([TENSORS, STATE])
            state = checkpoint.load_state(d)
            assert state["stage"] == s and len(state["history"]) == s + 1
            assert state["recipe_name"] == r["spec"].recipe_name and state["model"] == r["spec"].model
    t_sa = load_file(str(sa["rec"].ckpts[2] / TENSORS))
    bad = [n for n in t_sa if not SA_RE.fullmatch(n)]
    assert not bad, bad
    assert set(t_sa) == oracle.expected_names("sa_proj", "qwen2_5_vl", base)
    assert sum(v.numel() for v in t_sa.values()) == sa["rec"].metrics[-1]["trainable"]
    t_llm = load_file(str(llm["rec"].ckpts[2] / TENSORS))
    assert set(t_llm) == oracle.expected_names("llm", "qwen2_5_vl", base)
    assert sum(v.numel() for v in t_llm.values()) == llm["rec"].metrics[-1]["trainable"]
    # The checkpoint holds the final weights of the trial's model
    for n, v in t_sa.items():
        assert torch.equal(v, dict(sa["model"].named_parameters())[n].detach())
    size_ratio = (sa["rec"].ckpts[2] / TENSORS).stat().st_size / (llm["rec"].ckpts[2] / TENSORS).stat().st_size
    count_ratio = sa["resolved"].trainable / llm["resolved"].trainable
    assert size_ratio == pytest.approx(count_ratio, rel=0.03), (size_ratio, count_ratio)
    assert size_ratio < 0.5


# ---------------------------------------------------------------------------------------------
# 4. Full-model export


def test_to_full_model_loads_with_transformers_and_equals_base_plus_trained(two_stage, tmp_path):
    from transformers import AutoModelForImageTextToText

    r = two_stage["sa_proj"]
    ck = r["rec"].ckpts[2]
    out = checkpoint.to_full_model(ck, tmp_path / "full")
    m = AutoModelForImageTextToText.from_pretrained(str(out))
    sd, base, tensors = m.state_dict(), base_state(), load_file(str(ck / TENSORS))
    assert sd.keys() == base.keys()
    for n in base:
        assert torch.equal(sd[n], tensors[n] if n in tensors else base[n]), n
    # The folder is a complete model for the package too: evaluated, it scores what stage 2 reported.
    from lmm_ray import evaluate, models

    loaded = models.load_model(str(out))
    rep = evaluate.evaluate(loaded.model, loaded.processor, train.trial_eval_sets(r["spec"], loaded.processor),
                            batch_size=16, max_new_tokens=8)
    got = rep.metrics()
    for k in ("target/count/acc", "target/clock/acc", "heldout/color/acc", "heldout/shape/acc", "probe/number_mass"):
        assert got[k] == pytest.approx(r["rec"].metrics[-1][k], abs=1e-6), k


def test_to_full_model_lora_merges_adapters_into_targeted_modules_only(small_spec, tmp_path, oracle):
    from transformers import AutoModelForImageTextToText

    spec = small_spec("lora", lr=5e-3, stages=1, steps=4)
    rec, _, _, resolved = run(spec, tmp_path / "run")
    ck = rec.ckpts[1]
    tensors = load_file(str(ck / TENSORS))
    assert tensors and all(".lora_A." in n or ".lora_B." in n for n in tensors)
    out = checkpoint.to_full_model(ck, tmp_path / "full")
    m = AutoModelForImageTextToText.from_pretrained(str(out))
    sd, base = m.state_dict(), base_state()
    assert not [n for n in sd if "lora" in n.lower()]
    assert sd.keys() == base.keys()
    targets = oracle.lora_modules("lora", "qwen2_5_vl", base.items())
    assert set(targets) == set(resolved.lora_targets) and targets
    lo = spec.recipe.to_dict()["lora"]
    scale = lo["alpha"] / lo["rank"]
    for n in base:
        mod = n[: -len(".weight")]
        if n.endswith(".weight") and mod in targets:
            a = tensors[f"base_model.model.{mod}.lora_A.default.weight"]
            bb = tensors[f"base_model.model.{mod}.lora_B.default.weight"]
            assert not torch.equal(sd[n], base[n]), n
            torch.testing.assert_close(sd[n], base[n] + scale * bb @ a, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(sd[n], base[n]), n


# ---------------------------------------------------------------------------------------------
# 5. Resume without Ray


def test_resume_from_stage_checkpoint_equals_uninterrupted_run(small_spec, tmp_path):
    spec = small_spec("sa_proj", stages=3, steps=4)
    full = Recorder(tmp_path / "full")
    hist_full = train.run_trial(spec, full)
    assert [m["stage"] for m in full.metrics] == [1, 2, 3]

    stopped = Recorder(tmp_path / "stopped", stop_after=1)
    with pytest.raises(Stop):
        train.run_trial(spec, stopped)
    assert [m["stage"] for m in stopped.metrics] == [1]
    assert_same_metrics(stopped.metrics[0], full.metrics[0])

    resumed = Recorder(tmp_path / "resumed")
    hist_res = train.run_trial(spec, resumed, restore_dir=str(stopped.ckpts[1]))
    assert [m["stage"] for m in resumed.metrics] == [2, 3]  # stage 1 is not trained again
    for a, b in zip(resumed.metrics, full.metrics[1:]):
        assert_same_metrics(a, b)
    assert len(hist_res) == len(hist_full) == 4
    for a, b in zip(hist_res, hist_full):
        assert_same_metrics(a, b)
    ta, tb = load_file(str(resumed.ckpts[3] / TENSORS)), load_file(str(full.ckpts[3] / TENSORS))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)

    # Restarted after its last checkpoint: reports the final result again and trains nothing.
    again = Recorder(tmp_path / "again")
    train.run_trial(spec, again, restore_dir=str(full.ckpts[3]))
    assert len(again.metrics) == 1 and again.metrics[0]["stage"] == 3
    for k in ("learning", "heldout_change", "counting_bias", "objective", "target/count/acc"):
        assert again.metrics[0][k] == full.metrics[-1][k]


def test_restore_refuses_a_checkpoint_of_another_recipe(two_stage, small_spec):
    _, model, _ = train.prepare(small_spec("mlp"))
    with pytest.raises(ValueError, match="trainable set|does not have"):
        checkpoint.restore(two_stage["sa_proj"]["rec"].ckpts[1], model)


# ---------------------------------------------------------------------------------------------
# 6. Non-finite loss


def test_nonfinite_loss_reports_failure_with_stage_and_step_and_stops(small_spec, tmp_path):
    spec = small_spec("sa_proj", stages=3, steps=4)
    loaded, model, resolved = train.prepare(spec)
    calls = {"n": 0}

    def poison(mod, args, kwargs, out):  # training forwards only: the 2nd step of stage 2 goes NaN
        if mod.training:
            calls["n"] += 1
            if calls["n"] == 4 + 2:
                out.loss = out.loss * float("nan")
        return out

    model.register_forward_hook(poison, with_kwargs=True)
    rec = Recorder(tmp_path)
    hist = train.run_trial(spec, rec, loaded=loaded, model=model, resolved=resolved)  # does not raise
    assert [m["stage"] for m in rec.metrics] == [1, 1]
    assert not rec.metrics[0].get("failed")
    fail = rec.metrics[-1]
    assert fail["failed"] == 1
    assert re.search(r"stage 2\b.*step 2\b", fail["failure_reason"]), fail["failure_reason"]
    assert "nan" in fail["failure_reason"]
    assert sorted(rec.ckpts) == [1]  # no checkpoint for the failed stage, and stage 3 never ran
    assert len(hist) == 2
    assert calls["n"] == 6


def test_huge_learning_rate_fails_cleanly(small_spec, tmp_path):
    rec = Recorder(tmp_path)
    train.run_trial(small_spec("sa_proj", lr=1e6, stages=2, steps=4), rec)
    assert len(rec.metrics) == 1 and rec.metrics[0]["failed"] == 1
    assert re.search(r"stage 1, step \d+ \(lr=1e\+06\)", rec.metrics[0]["failure_reason"])
    assert rec.metrics[0]["stage"] == 0 and not rec.ckpts
    # every aggregate is reported (NaN): Tune refuses a result without its metric, which ended the sweep
    assert all(math.isnan(rec.metrics[0][k]) for k in ("objective", "learning", "heldout_change", "counting_bias"))


# ---------------------------------------------------------------------------------------------
# 7. LwF and WiSE-FT


def test_lwf_distils_from_the_stage_start_model(small_spec, tmp_path, monkeypatch):
    from lmm_ray import optim

    seen = []
    real = optim.lwf_loss

    def spy(student_logits, teacher_logits, labels, temperature):
        v = real(student_logits, teacher_logits, labels, temperature)
        seen.append((float(v.detach()), temperature))
        return v

    monkeypatch.setattr(optim, "lwf_loss", spy)
    spec = small_spec("lwf", stages=2, steps=3)
    rec, hist, model, _ = run(spec, tmp_path)
    assert [m["stage"] for m in rec.metrics] == [1, 2] and not any(m.get("failed") for m in rec.metrics)
    assert len(seen) == 6 and all(t == 2.0 for _, t in seen)
    # First step of each stage: the student is the teacher, so the distillation term is 0; later it is not.
    for first in (0, 3):
        assert abs(seen[first][0]) < 1e-5
        assert seen[first + 1][0] > 1e-6 and seen[first + 2][0] > 1e-6
    assert not any(p.requires_grad for n, p in model.named_parameters() if "mlp" not in n)


def test_wise_ft_interpolates_with_the_stage_start_weights(small_spec, tmp_path, monkeypatch):
    spec = small_spec("wise_ft", stages=2, steps=3)
    alpha = spec.recipe.wise_ft["alpha"]
    assert alpha == 0.1
    snaps = []
    real = train.train_stage

    def spy(model, encs, **kw):  # the trainable weights before and after plain fine-tuning
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        stats = real(model, encs, **kw)
        after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        snaps.append((before, after))
        return stats

    monkeypatch.setattr(train, "train_stage", spy)
    rec, _, model, _ = run(spec, tmp_path)
    assert len(snaps) == 2 and sorted(rec.ckpts) == [1, 2]
    for s, (before, tuned) in enumerate(snaps, start=1):
        saved = load_file(str(rec.ckpts[s] / TENSORS))
        assert saved.keys() == before.keys()
        for n in saved:
            expect = alpha * before[n] + (1 - alpha) * tuned[n]
            torch.testing.assert_close(saved[n], expect, rtol=1e-6, atol=1e-7)
            assert not torch.equal(saved[n], tuned[n])
    # stage 2 starts from stage 1's interpolated weights, not from its tuned ones
    s1 = load_file(str(rec.ckpts[1] / TENSORS))
    assert all(torch.equal(snaps[1][0][n], s1[n]) for n in s1)


# ---------------------------------------------------------------------------------------------
# DDP: a loss that goes non-finite on one rank only stops every rank at the same step (no hang)


class Out:  # a model output: train_stage reads `.loss`
    def __init__(self, loss):
        self.loss = loss


def _ddp_nonfinite_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os
    import time

    import torch.distributed as dist

    from lmm_ray.optim import NonFiniteLoss, train_stage

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.calls = 0

        def forward(self, input_ids, x):
            self.calls += 1
            loss = self.lin(x).pow(2).mean()
            if rank == 1 and self.calls == 3:  # only rank 1 overflows, at its 3rd step
                loss = loss * float("inf")
            return Out(loss)

    encs = [{"input_ids": torch.ones(1, 2, dtype=torch.long), "x": torch.randn(1, 4)} for _ in range(16)]
    model = train.SyncNonFinite(torch.nn.parallel.DistributedDataParallel(Toy()))
    try:
        train_stage(model, encs, steps=6, lr=1e-2, batch_size=4, pad_id=0, seed=0, stage=1, rank=rank, world_size=world)
        msg = "finished"
    except NonFiniteLoss as e:
        msg = str(e)
    Path(out_dir, f"rank{rank}").write_text(msg)
    # Like the report barrier of Ray Train: wait for the other rank before leaving.
    deadline = time.time() + 90
    while not Path(out_dir, f"rank{1 - rank}").exists() and time.time() < deadline:
        time.sleep(0.1)
    dist.destroy_process_group()


def test_ddp_nonfinite_on_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_ddp_nonfinite_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 60
    try:
        while not ctx.join(timeout=1):
            assert time.time() < deadline, "DDP ranks hang after a non-finite loss on one rank"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    msgs = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    assert all(re.search(r"stage 1, step 3\b", m) for m in msgs), msgs
    assert "inf" in msgs[1] and "nan" in msgs[0]


# ---------------------------------------------------------------------------------------------
# 6. Data built once per sweep (train.build_trial_data) and one processor call per sample


def test_shared_trial_data_gives_the_same_trial_and_no_processor_call(small_spec, tmp_path, monkeypatch):
    from lmm_ray import data

    spec = small_spec("sa_proj", stages=2, steps=6)  # 6 steps x 8 from a pool of 64: some samples drawn twice
    calls = []
    real_one = data._one
    monkeypatch.setattr(data, "_one", lambda *a, **k: (calls.append(1), real_one(*a, **k))[1])

    plain = Recorder(tmp_path / "plain")
    hist_plain = train.run_trial(spec, plain)
    n_eval = len(spec.stages + spec.heldout) * spec.eval.n_per_skill + len(spec.heldout) * spec.eval.caption_probe_n
    # one call per evaluation prompt and per pool sample, however often a stage draws it
    assert len(calls) == n_eval + len(spec.stages) * spec.train.n_train

    loaded = train.load(spec)  # another process would build it: a fresh processor
    path = str(tmp_path / train.TRIAL_DATA)
    train.save_trial_data(path, train.build_trial_data(spec, loaded.processor, model=loaded.model))
    shared = train.load_trial_data(path, spec)
    assert shared is not None
    calls.clear()
    with_shared = Recorder(tmp_path / "shared")
    hist_shared = train.run_trial(spec, with_shared, shared=shared)
    assert calls == [], "a trial with the sweep's data must not run the processor"
    assert len(hist_shared) == len(hist_plain) == 3
    for a, b in zip(with_shared.metrics, plain.metrics):
        assert_same_metrics(a, b)
    ta, tb = load_file(str(with_shared.ckpts[2] / TENSORS)), load_file(str(plain.ckpts[2] / TENSORS))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)

    # Another pool size or seed: the file is not this trial's data, so it is not used.
    assert train.load_trial_data(path, small_spec("sa_proj", stages=2, steps=6, train={"n_train": 32})) is None
    assert train.load_trial_data(path, small_spec("sa_proj", stages=2, steps=6, train={"seed": 1})) is None
    assert train.load_trial_data(path, small_spec("mlp", lr=5e-4, stages=2, steps=6)) is not None  # recipe, lr: same data


def test_encoded_pool_gives_the_batches_of_the_lazy_pool_and_the_same_forward(small_spec):
    from lmm_ray import data, stream

    spec = small_spec("sa_proj", stages=1, steps=6)
    loaded = train.load(spec)
    samples = train.stage_pool(spec, 0)
    kw = dict(pad_id=loaded.tokenizer.pad_token_id, steps=6, batch_size=8, seed=0, stage=1)
    lazy = list(stream.stage_loader(samples, loaded.processor, **kw))
    encoded = list(stream.stage_loader(train.stage_inputs(spec, 0, loaded.processor, loaded.model), **kw))
    assert len(lazy) == len(encoded) == 6
    model = loaded.model.train()
    for a, b in zip(lazy, encoded):
        assert set(b) == set(a) | {data.POSITION_KEY}
        assert all(torch.equal(a[k], b[k]) for k in a)
        # Per-sample position ids, padded, are exactly what the model computes for the batch ...
        pos = model.model.get_rope_index(a["input_ids"], mm_token_type_ids=a["mm_token_type_ids"],
                                         image_grid_thw=a["image_grid_thw"], attention_mask=a["attention_mask"])[0]
        assert torch.equal(b[data.POSITION_KEY], pos)
        # ... so the training forward (loss and logits) is bit for bit the same.
        oa, ob = model(**a), model(**b)
        assert torch.equal(oa.loss, ob.loss) and torch.equal(oa.logits, ob.logits)
