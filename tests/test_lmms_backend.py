"""lmms-eval as an in-process backend (lmm_ray/lmms_backend.py) on a local ChartQA-like task.

The task (built per session under a tmp folder): 8 generated chart images (`tallest_bar` words and
`bar_value` digits, held-out skills the ci base was trained on) in a parquet file, an lmms-eval
YAML whose `process_docs` keeps 7 of them (`fixed_subset`, "random:7"), and lmms-eval's own ChartQA
functions (chartqa_doc_to_visual / doc_to_text / process_results: relaxed accuracy). The same task
runs in this process and on 2 Ray Train workers (gloo), replicated and under FSDP2; all must give
the same predictions and scores, and the score must equal lmm_ray.metrics' relaxed accuracy over
the per-sample predictions.

Needs the `lmms-eval` extra: without it these tests are skipped with the reason (pytest -ra prints
it), except under CI=true, where a missing extra fails (scripts/install.sh installs it).
"""

from __future__ import annotations

import json
import os
import random
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmm_ray import lmms_backend as LB
from lmm_ray import metrics

CI_BASE = "base:qwen2_5_vl@ci"
TASK = "lmm_ray_tiny_chartqa"
ROWS = (("tallest_bar", 4), ("bar_value", 4))
KEEP = 7
BATCH = 4
MAX_NEW_TOKENS = 8

WHY = LB.missing()  # looks lmms-eval up without importing it
HAVE_EXTRA = WHY is None
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason=f"the lmms-eval extra is missing: {WHY}")


def test_extra_is_installed_under_ci():
    """CI must run the tests below, not skip them."""
    if not HAVE_EXTRA:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the lmms-eval extra is missing: {WHY}")
        pytest.skip(f"the lmms-eval extra is missing: {WHY}")


# ---------------------------------------------------------------------------------------------
# check_tasks


def test_missing_extra_names_the_install_command(monkeypatch):
    LB.require.cache_clear()
    LB._task_manager.cache_clear()
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as if not installed
    try:
        assert not LB.available() and "not installed" in LB.missing()
        with pytest.raises(ValueError, match=r'pip install -e "\.\[lmms-eval\]".*--no-deps lmms-eval==0\.7\.3'):
            LB.check_tasks(["chartqa"])
        with pytest.raises(LB.LmmsEvalMissing):
            LB.run_tasks(None, None, {"x": "chartqa"})
    finally:
        LB.require.cache_clear()
        LB._task_manager.cache_clear()


@needs_extra
def test_filelock_4_is_named(monkeypatch):
    LB.require.cache_clear()
    monkeypatch.setitem(sys.modules, "filelock._api", None)  # filelock 4 has no _api module
    try:
        with pytest.raises(LB.LmmsEvalMissing, match=r"filelock<4"):
            LB.require()
    finally:
        LB.require.cache_clear()


@needs_extra
def test_check_tasks_accepts_tasks_and_suggests_for_typos(lmms_task):
    LB.check_tasks(["chartqa", "ai2d", "docvqa_val"])
    LB.check_tasks([TASK], include_path=lmms_task)
    with pytest.raises(ValueError, match=r"unknown lmms-eval task 'chartqaa'.*Did you mean 'chartqa'\?"):
        LB.check_tasks(["chartqa", "chartqaa"])
    with pytest.raises(ValueError, match=r"unknown lmms-eval task"):
        LB.check_tasks([TASK])  # the local task exists only with its include_path
    with pytest.raises(ValueError, match=r"not a folder"):
        LB.check_tasks([TASK], include_path=lmms_task / "nowhere")


@needs_extra
def test_check_tasks_refuses_groups():
    tm = LB.task_manager()
    group = next(iter(tm.all_groups))
    with pytest.raises(ValueError, match="group or tag, not a task"):
        LB.check_tasks([group])


# ---------------------------------------------------------------------------------------------
# The local task


def write_task(root: Path) -> Path:
    """The tiny ChartQA-like task under root/tasks (returned: the include_path); data in root/data."""
    import datasets

    from lmm_ray import evaluate, skills

    rows = {"image": [], "question": [], "answer": [], "type": []}
    for skill, n in ROWS:
        for i, s in enumerate(skills.generate(skill, n, seed=evaluate.eval_seed(0))):
            rows["image"].append(s.image)
            rows["question"].append(s.question)
            rows["answer"].append(s.answer)
            rows["type"].append("human_test" if i % 2 == 0 else "augmented_test")
    feats = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                               "answer": datasets.Value("string"), "type": datasets.Value("string")})
    (root / "data").mkdir(parents=True, exist_ok=True)
    parquet = root / "data" / "test.parquet"
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(parquet))
    tdir = root / "tasks" / "tiny_chartqa"
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "utils.py").write_text(textwrap.dedent(f"""\
        from lmms_eval.tasks.chartqa.utils import (  # noqa: F401  lmms-eval's own ChartQA functions
            chartqa_doc_to_text, chartqa_doc_to_visual, chartqa_process_results)

        from lmm_ray.lmms_backend import fixed_subset


        def process_docs(ds):
            return fixed_subset(ds, "random:{KEEP}", seed=0)
        """))
    (tdir / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: {parquet}
          cache_dir: {root / "hf_datasets"}
        test_split: test
        output_type: generate_until
        process_docs: !function utils.process_docs
        doc_to_visual: !function utils.chartqa_doc_to_visual
        doc_to_text: !function utils.chartqa_doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: {MAX_NEW_TOKENS}
          temperature: 0
          do_sample: false
        process_results: !function utils.chartqa_process_results
        metric_list:
          - metric: relaxed_overall
            aggregation: mean
            higher_is_better: true
          - metric: relaxed_human_split
            aggregation: mean
            higher_is_better: true
          - metric: relaxed_augmented_split
            aggregation: mean
            higher_is_better: true
        lmms_eval_specific_kwargs:
          default:
            pre_prompt: ""
            post_prompt: ""
        metadata:
          - version: 0.0
        """))
    return root / "tasks"


@pytest.fixture(scope="module")
def lmms_task(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("lmms_task"))


@pytest.fixture(scope="module")
def ci_loaded(ci_base):
    from lmm_ray import models

    loaded = models.load_model(str(ci_base))
    loaded.model.eval()
    return loaded


def _rng_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()


@pytest.fixture(scope="module")
def one_process(ci_loaded, lmms_task):
    before = _rng_states()
    t0 = time.perf_counter()
    out = LB.run_tasks(ci_loaded.model, ci_loaded.processor, {"chart": TASK}, batch_size=BATCH,
                       include_path=lmms_task, keep_first_logits=True)
    wall = time.perf_counter() - t0
    print(f"[lmms] {TASK}: {out['chart']['n']} docs in one process, run_tasks {wall:.1f} s "
          f"(simple_evaluate {out['chart']['run_seconds']:.1f} s)", file=sys.stderr)
    return out, before, _rng_states()


@needs_extra
@pytest.mark.slow
def test_one_process_scores_the_fixed_subset_with_lmms_eval_metric(one_process, ci_loaded):
    out, _, _ = one_process
    r = out["chart"]
    assert r["task"] == TASK and r["metric"] == "relaxed_overall"
    assert r["n"] == KEEP  # process_docs kept 7 of 8 rows (not `limit`)
    ids = [s["id"] for s in r["samples"]]
    assert ids == list(range(KEEP))
    for s in r["samples"]:
        assert isinstance(s["prediction"], str) and len(s["answers"]) == 1
        # lmms-eval's per-sample relaxed accuracy == ours on the same prediction
        assert s["score"] == metrics.relaxed(s["prediction"], s["answers"])
    # lmms-eval's aggregate == lmm_ray.metrics' score over the same predictions, exactly
    ours = metrics.score([{"prediction": s["prediction"], "answers": s["answers"]} for s in r["samples"]], "relaxed")
    assert ours["n"] == KEEP
    assert r["score"] == ours["score"]
    assert 0 < r["score"] <= 100, "the ci base should answer some chart questions"
    # first-step logits: one row per document, over the vocabulary
    assert r["first_logits"].shape == (KEEP, ci_loaded.model.config.get_text_config().vocab_size)
    assert ci_loaded.model.training is False


@needs_extra
@pytest.mark.slow
def test_one_process_does_not_reseed_and_restores_env(one_process):
    _, before, after = one_process
    assert before[0] == after[0]
    assert np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])
    assert os.environ.get("RANK") is None or os.environ.get("RANK") == "0"


@needs_extra
@pytest.mark.slow
def test_predictions_equal_lmm_ray_evaluate(one_process, ci_loaded, lmms_task):
    """Same images (PNG through parquet is lossless), same chat template, same batches: our own
    evaluator gives the same answers as the lmms-eval path."""
    from lmm_ray import evaluate, skills
    from lmm_ray.skills.loaders import apply_sampling

    samples = [s for skill, n in ROWS for s in skills.generate(skill, n, seed=evaluate.eval_seed(0))]
    kept = apply_sampling(samples, f"random:{KEEP}", 0)
    es = evaluate.build_eval_sets(ci_loaded.processor, {"chart": kept}, {"chart": "heldout"})
    rep = evaluate.evaluate(ci_loaded.model, ci_loaded.processor, es, batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS)
    lmms = one_process[0]["chart"]
    assert [s["prediction"] for s in lmms["samples"]] == rep.predictions["chart"]
    assert [s["answers"][0] for s in lmms["samples"]] == [s.answer for s in kept]
    assert [s["prompt"] for s in lmms["samples"]] == [s.question for s in kept]  # post_prompt ""
    # and the first-step logits the probe reads
    torch.testing.assert_close(lmms["first_logits"], rep.results["chart"].first_logits, rtol=1e-5, atol=1e-5)


def _strip(out: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk not in ("first_logits", "run_seconds")} for k, v in out.items()}


def two_worker_loop(config: dict) -> None:
    """Every rank: run_tasks on the replicated model, then on the FSDP2-sharded one; each rank writes its results."""
    import ray.train

    from lmm_ray import lmms_backend, models, parallel

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    loaded = models.load_model(config["model"])
    loaded.model.eval()
    seen: list[int] = []  # requests this rank generated, per call: lmms-eval shards the documents
    real = lmms_backend.generate
    lmms_backend.generate = lambda lm, requests: seen.append(len(requests)) or real(lm, requests)
    rows = {}
    for mode in ("replicated", "fsdp"):
        seen.clear()
        if mode == "fsdp":
            parallel.shard_model(loaded.model, loaded.family, mp_dtype=None)
        t0 = time.perf_counter()
        out = lmms_backend.run_tasks(loaded.model, loaded.processor, {"chart": config["task"]},
                                     batch_size=config["batch"], include_path=config["include_path"],
                                     keep_first_logits=True)
        rows[mode] = {"out": {k: {kk: vv for kk, vv in v.items() if kk != "first_logits"} for k, v in out.items()},
                      "first_logits": out["chart"]["first_logits"].tolist(), "seconds": time.perf_counter() - t0,
                      "env_rank": os.environ.get("RANK"), "env_world": os.environ.get("WORLD_SIZE"),
                      "requests": list(seen)}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(rows))
    ray.train.report({"done": 1})


@pytest.fixture(scope="module")
def two_workers(ray_local, ci_base, lmms_task, tmp_path_factory):
    import ray.train
    import ray.train.torch
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    out = tmp_path_factory.mktemp("lmms_2w")
    t0 = time.perf_counter()
    res = ray.train.torch.TorchTrainer(
        two_worker_loop,
        train_loop_config={"model": str(ci_base), "task": TASK, "include_path": str(lmms_task), "batch": BATCH,
                           "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.9}),
        run_config=ray.train.RunConfig(storage_path=str(out / "storage"), name="lmms"),
    ).fit()
    print(f"[lmms] 2 Ray Train workers (replicated + FSDP): {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    assert res.error is None, res.error
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@needs_extra
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_two_workers_equal_one_process_exactly(two_workers, one_process, mode):
    one = _strip(one_process[0])
    for rank, rows in enumerate(two_workers):
        got = rows[mode]
        assert _strip(got["out"]) == one, f"rank {rank} ({mode}) differs from one process"
        assert got["env_rank"] == str(rank) and got["env_world"] == "2"  # Ray Train's, restored after the call
        # 7 documents over 2 ranks: 4 and 3, the short rank padded with a repeat, so both generate 4
        assert got["requests"] == [(KEEP + 1) // 2]
        torch.testing.assert_close(torch.tensor(got["first_logits"]), one_process[0]["chart"]["first_logits"],
                                   rtol=1e-4, atol=1e-4)
    r = two_workers[0][mode]["out"]["chart"]
    ours = metrics.score([{"prediction": s["prediction"], "answers": s["answers"]} for s in r["samples"]], "relaxed")
    assert r["score"] == ours["score"]


# ---------------------------------------------------------------------------------------------
# The wiring: a held-out entry `lmms_eval:` in a trial


@needs_extra
def test_a_trial_scores_an_lmms_eval_heldout_task_each_stage(small_spec, lmms_task, tmp_path):
    """run_trial evaluates `{name: chart, lmms_eval: <task>}` after every stage (and for the base),
    reports it as heldout/chart/acc (in the held-out mean), and writes its predictions."""
    from dataclasses import replace

    from lmm_ray import train
    from lmm_ray.config import HeldoutConfig
    from lmm_ray.schema import EvalConfig

    spec = small_spec("sa_proj", stages=1, steps=2)
    spec = replace(spec, heldout=(*spec.heldout, HeldoutConfig("chart", lmms_eval=TASK)),
                   eval=EvalConfig(**{**spec.eval.__dict__, "lmms_include_path": str(lmms_task)}),
                   predictions_dir=str(tmp_path / "preds"))
    rows: list[dict] = []
    hist = train.run_trial(spec, lambda m, d: rows.append(dict(m)))
    for h in hist:  # base and stage 1
        assert 0.0 <= h["heldout/chart/acc"] <= 100.0
        accs = [h[f"heldout/{n}/acc"] for n in ("color", "shape", "chart")]
        assert h["heldout/mean_acc"] == pytest.approx(sum(accs) / 3)
        assert "probe/number_mass" in h  # the probe reads the other held-out sets
    for stage in (0, 1):
        lines = (tmp_path / "preds" / f"stage{stage}" / "chart.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        assert len(recs) == KEEP and recs[0]["metric"].startswith(f"lmms_eval:{TASK}/")
        assert 100.0 * sum(r["score"] for r in recs) / len(recs) == pytest.approx(hist[stage]["heldout/chart/acc"])
