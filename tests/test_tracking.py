"""MLflow as the fallback source of a sweep's results table (when results.csv is missing)."""

import math

from lmm_ray import pareto, tracking


def _child(c, exp, sweep, parent, tid, recipe, lr, status, metrics):
    run = c.create_run(exp, run_name=tid, tags={"mlflow.parentRunId": parent, "lmm_ray.sweep": sweep, "lmm_ray.role": "trial",
                                               "lmm_ray.trial_id": tid, "lmm_ray.status": status})
    tracking._params(c, run.info.run_id, {"recipe": recipe, "lr": lr, "search.recipe": recipe, "search.lr": lr, "search.lora_rank": 8})
    for step, m in enumerate(metrics, start=1):
        for k, v in m.items():
            c.log_metric(run.info.run_id, k, v, step=step)


def test_results_rebuilt_from_mlflow_feed_the_front(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.parent_run(uri, "exp", "sw", {"name": "sw"})
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("exp").experiment_id
    good = {"learning": 30.0, "heldout_change": -5.0, "counting_bias": 0.01, "objective": 24.0, "stage": 2}
    _child(c, exp, "sw", parent, "a", "sa_proj", 1e-3, "finished", [{**good, "learning": 10.0, "stage": 1}, good])
    _child(c, exp, "sw", parent, "b", "full", 1e-3, "finished",
           [{"learning": 35.0, "heldout_change": -60.0, "counting_bias": 0.3, "objective": -55.0, "stage": 2}])
    _child(c, exp, "sw", parent, "c", "mlp", 1e-3, "stopped",  # stopped early: must never be on the front
           [{"learning": 99.0, "heldout_change": 0.0, "counting_bias": 0.0, "objective": 99.0, "stage": 1}])
    res = tracking.results_from_mlflow(uri, "exp", "sw").set_index("trial_id")
    assert res.loc["a", "learning"] == 30.0  # the last value, not the first stage's
    assert res.loc["a", "param/lora_rank"] == "8" and res.loc["a", "stages_completed"] == 2
    assert res.loc["c", "status"] == "stopped" and math.isnan(res.loc["c", "target_forgetting"])
    assert set(pareto.front(res.reset_index())["trial_id"]) == {"a", "b"}
