"""MLflow: the fallback source of a sweep's results table, what trial and sweep runs hold (names,
step 0, params, the Pareto front as tags and description), and `lmm-ray ui`."""

import math
from pathlib import Path

import pandas as pd

from lmm_ray import pareto, tracking

SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"


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


# --- what a trial run holds: names, step 0, params once, constants as params ---------------------

import json  # noqa: E402
import socket  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from lmm_ray import cli, results  # noqa: E402

BASE = {"target/count/acc": 10.0, "target/clock/acc": 5.0, "target/mean_acc": 7.5, "heldout/color/acc": 80.0,
        "heldout/shape/acc": 60.0, "heldout/mean_acc": 70.0, "probe/number_mass": 0.1, "probe/number_mass_change": 0.0,
        "probe/kl_base": 0.0, "probe/entropy": 1.2345678}


def stage_result(stage: int, held: float, learning: float) -> dict:
    """What train.py reports after a stage (plus Tune's own keys)."""
    return {**BASE, "heldout/color/acc": held + 10, "heldout/shape/acc": held - 10, "heldout/mean_acc": held,
            "target/count/acc": 10.0 + learning, "stage": stage, "stages_total": 2, "timesteps_total": stage,
            "stage_skill": "count", "trainable": 300, "total_params": 1000, "trainable_share": 0.3,
            "roles/llm.attn.q": 100, "roles/llm.attn.k": 200, "train_loss_first": 2.0, "train_loss_last": 1.0,
            "stage_train_seconds": 3.0, "stage_steps": 5, "learning": learning, "target_forgetting": 0.0,
            "heldout_change": held - 70.0, "heldout_change_final": held - 70.0, "heldout_change_worst": held - 70.0,
            "counting_bias": 0.0123456789, "counting_bias_final": 0.0123456789, "kl_base": 0.5, "objective": learning / 3,
            "trial_id": "abc12345", "training_iteration": stage, "time_total_s": 1.0, "timestamp": 1700000000 + stage,
            "done": False, "pid": 1, "date": "x", "hostname": "h", "node_ip": "1.2.3.4"}


def test_mlflow_names_have_one_slash_level_and_no_constants():
    assert tracking.mlflow_name("target/count/acc") == "target/count"
    assert tracking.mlflow_name("heldout/color/acc") == "heldout/color"
    assert tracking.mlflow_name("heldout/mmmu/anls") == "heldout/mmmu_anls"
    assert tracking.mlflow_name("heldout/mean_acc") == "heldout/mean"
    assert tracking.mlflow_name("probe/kl_base") == "probe/kl_base"
    assert tracking.mlflow_name("heldout_change_worst") == "heldout/change_worst"
    assert tracking.mlflow_name("train_loss_last") == "train/loss_last"
    for key in ("learning", "heldout_change", "counting_bias", "objective", "target_forgetting"):
        assert tracking.mlflow_name(key) == key
    m = tracking.stage_metrics(stage_result(1, 60.0, 6.0), BASE)
    assert all(k.count("/") <= 1 for k in m), m
    for constant in ("stage", "stages_total", "timesteps_total", "trainable", "total_params", "trainable_share",
                     "roles/llm.attn.q", "heldout_change_final", "counting_bias_final", "kl_base", "training_iteration",
                     "time_total_s", "timestamp", "pid"):
        assert constant not in m and tracking.mlflow_name(constant) is None, constant
    assert m["heldout/change"] == -10.0 and m["heldout_change"] == -10.0  # per stage and running mean (equal at stage 1)
    assert m["counting_bias"] == 0.01235 and m["probe/entropy"] == 1.235  # 4 significant digits
    assert tracking.fmt_value(0.000161234) == "1.61e-4" and tracking.fmt_value(0.5) == "0.5" and tracking.fmt_value(8) == "8"


def _fake_trial(tid="abc12345", config=None):
    return SimpleNamespace(trial_id=tid, config=config or {"recipe": "mlp", "lr": 0.000161234567, "lora_rank": 8},
                           local_path=None, last_result={})


def test_trial_logger_logs_the_base_as_step_0_and_params_once(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.parent_run(uri, "exp", "sw", {"name": "sw", "stages": [{"name": "count"}, {"name": "clock"}]})
    monkeypatch.setattr(tracking, "LINKS", tracking.Links())
    tracking.LINKS.optuna["abc12345"] = 6
    logger = tracking.TrialLogger(uri, "exp", "sw", parent, 2, BASE, ["count", "clock"])
    trial = _fake_trial()
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, stage_result(1, 60.0, 6.0))
    logger.on_trial_result(0, [], trial, stage_result(1, 60.0, 6.0))  # a restarted trial reports stage 1 again
    logger.on_trial_result(0, [], trial, stage_result(2, 50.0, 9.0))
    trial.last_result = stage_result(2, 50.0, 9.0)
    logger.on_trial_complete(0, [], trial)
    c = tracking.client(uri)
    run = c.get_run(tracking.LINKS.runs["abc12345"])
    assert run.info.run_name == "mlp lr=1.61e-4 #6"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["lmm_ray.trial_id"] == "abc12345" and tags["lmm_ray.optuna_trial"] == "6"
    assert tags["lmm_ray.stages_completed"] == "2" and json.loads(tags["lmm_ray.config"])["lr"] == 0.000161234567
    assert "0 base, 1 count, 2 clock" in tags["mlflow.note.content"]
    # the sampled values once, readable; the recipe's sizes as params; no sweep config on a trial run
    assert params == {"recipe": "mlp", "lr": "1.61e-4", "lora_rank": "8", "trainable": "300", "total_params": "1000",
                      "trainable_share": "0.3", "roles/llm.attn.q": "100", "roles/llm.attn.k": "200"}
    assert not {"stage", "stages_total", "trainable", "roles/llm.attn.q", "heldout_change_final"} & set(metrics)
    assert all(k.count("/") <= 1 for k in metrics)
    hist = lambda key: [(m.step, m.value) for m in sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]  # noqa: E731
    assert hist("heldout/mean") == [(0, 70.0), (1, 60.0), (2, 50.0)]  # the fall from the base
    assert hist("heldout/change") == [(0, 0.0), (1, -10.0), (2, -20.0)]  # per stage ...
    assert hist("heldout_change") == [(0, 0.0), (1, -10.0), (2, -20.0)]  # ... beside the running mean (fake: equal)
    assert hist("learning") == [(0, 0.0), (1, 6.0), (2, 9.0)] and [s for s, _ in hist("objective")] == [0, 1, 2]
    # the parent holds the sweep config and the step -> skill map
    assert c.get_run(parent).data.params["step_to_skill"] == "0 base, 1 count, 2 clock"
    # the results table rebuilt from these runs
    res = tracking.results_from_mlflow(uri, "exp", "sw").iloc[0]
    assert res["lr"] == 0.000161234567 and res["param/lora_rank"] == 8 and res["optuna_trial"] == 6
    assert res["heldout_change_final"] == -20.0 and res["kl_base"] == 0.0 and res["stages_completed"] == 2
    assert res["trainable"] == 300 and res["status"] == "finished"


def test_pareto_front_as_tags_and_description_logged_once(tmp_path, monkeypatch):
    from lmm_ray import config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = config.load_sweep(SMOKE, [f"storage={tmp_path}", "name=sw", f"tracking.mlflow_uri={uri}", "tracking.experiment=exp"])
    parent = tracking.parent_run(uri, "exp", "sw", cfg.to_dict())
    monkeypatch.setattr(tracking, "LINKS", tracking.Links())
    logger = tracking.TrialLogger(uri, "exp", "sw", parent, 2, BASE, cfg.stage_names)
    rows = []
    for i, (tid, recipe, learning, held, bias) in enumerate([("t1", "mlp", 20.0, -10.0, 0.05), ("t2", "full", 30.0, -60.0, 0.3),
                                                             ("t3", "sa_proj", 10.0, -30.0, 0.1)]):
        tracking.LINKS.optuna[tid] = i
        trial = _fake_trial(tid, {"recipe": recipe, "lr": 1e-4 * (i + 1)})
        logger.on_trial_start(0, [], trial)
        rows.append({"trial_id": tid, "status": "finished", "recipe": recipe, "lr": 1e-4 * (i + 1), "learning": learning,
                     "target_forgetting": 0.0, "heldout_change": held, "counting_bias": bias, "objective": learning + held,
                     "optuna_trial": i})
    res = pd.DataFrame(rows)
    front = pareto.front(res)
    assert set(front["trial_id"]) == {"t1", "t2"}  # t3 is dominated by t1
    for _ in range(2):  # a re-run of a finished sweep logs nothing new on the parent
        tracking.log_result(cfg, parent, res, front, [])
    c = tracking.client(uri)
    runs = {r.data.tags["lmm_ray.trial_id"]: r for r in tracking.child_runs(uri, "exp", "sw")}
    assert {t: r.data.tags["pareto_optimal"] for t, r in runs.items()} == {"t1": "true", "t2": "true", "t3": "false"}
    assert runs["t2"].data.tags["pick"] == "max-learning" and "min-forgetting" in runs["t1"].data.tags["pick"]
    assert "pick" not in runs["t3"].data.tags
    p = c.get_run(parent).data
    assert p.tags["best_trial"] == "t1" and p.tags["best_run_id"] == runs["t1"].info.run_id
    note = p.tags["mlflow.note.content"]
    assert "### Pareto-optimal trials" in note and "| Pareto | trial |" in note and "mlp lr=1e-4 #0" in note
    assert "hypervolume" in note and "held-out change -50" in note  # the reference point, printed
    ref = results.reference(cfg.objective)
    # t1 = (20, -10, 0.05) against (0, -50, 0.2): 20 x 40 x 0.15; t2 forgets more than -50, adds nothing
    assert pareto.front_hypervolume(res, ref=ref) == pytest.approx(120) == p.metrics["hypervolume"]
    assert pareto.front_hypervolume(res) == 0  # against the base itself every trial forgets: 0
    for key in ("best_objective", "front_size", "hypervolume"):
        assert len(c.get_metric_history(parent, key)) == 1, key
    # a later run of the sweep that picks differently moves the tags
    res.loc[res.trial_id == "t3", ["learning", "heldout_change", "objective"]] = [40.0, -5.0, 35.0]
    tracking.log_result(cfg, parent, res, pareto.front(res), [])
    runs = {r.data.tags["lmm_ray.trial_id"]: r for r in tracking.child_runs(uri, "exp", "sw")}
    assert runs["t3"].data.tags["pareto_optimal"] == "true" and "pick" not in runs["t2"].data.tags
    assert [m.value for m in c.get_metric_history(parent, "best_objective")] == [10.0, 35.0]
    assert c.get_run(parent).data.tags["best_trial"] == "t3"


# --- lmm-ray ui ----------------------------------------------------------------------------------


def _sweep_folder(tmp_path):
    d = tmp_path / "sw"
    d.mkdir()
    uri = f"sqlite:///{d}/mlflow.db"
    parent = tracking.parent_run(uri, "sw", "sw", {"name": "sw"})
    (d / "sweep.json").write_text(json.dumps({"name": "sw", "tracking": {"mlflow_uri": uri, "experiment": "sw"}}))
    return d, uri, parent


def test_ui_prints_the_runs_table_url_and_runs_mlflow_lean(tmp_path, monkeypatch, capsys):
    from lmm_ray import ui

    d, uri, parent = _sweep_folder(tmp_path)
    calls = []
    monkeypatch.setattr(ui, "serve", lambda argv, env: calls.append((argv, env)) or 0)
    assert cli.main(["ui", str(d), "--port", "5987"]) == 0
    out = capsys.readouterr().out
    exp = tracking.client(uri).get_experiment_by_name("sw")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs, not GenAI traces
    table = f"http://127.0.0.1:5987/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&searchFilter="
    assert f"runs table: {table}" in out, out
    assert f"sweep run:  http://127.0.0.1:5987/#/experiments/{exp.experiment_id}/runs/{parent}?workflowType=machine_learning" in out
    (argv, env), = calls
    assert argv[argv.index("--backend-store-uri") + 1] == uri and argv[argv.index("--port") + 1] == "5987"
    assert argv[argv.index("--workers") + 1] == "1" and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_ui_refuses_a_busy_port(tmp_path, monkeypatch, capsys):
    from lmm_ray import ui

    d, _, _ = _sweep_folder(tmp_path)
    monkeypatch.setattr(ui, "serve", lambda *a, **k: pytest.fail("started MLflow on a busy port"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli.main(["ui", str(d), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and f"--port {port + 1}" in err


def test_cli_help_is_written_for_users():
    import argparse

    parser = cli.build_parser()
    text = parser.format_help()
    assert "validate" in text and "The flow:" in text and "lmm-ray ui runs/quickstart" in text
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, verb in sub.choices.items():
        assert verb.description, name
        for action in verb._actions:
            assert action.help, (name, action.option_strings or action.dest)


def test_description_fits_in_an_mlflow_tag():
    from lmm_ray import config

    cfg = config.load_sweep(SMOKE)
    n = 300
    res = pd.DataFrame({"trial_id": [f"t{i:05d}" for i in range(n)], "status": "finished", "recipe": "mlp_gate_up",
                        "lr": 1e-4, "learning": range(n), "target_forgetting": 0.0, "heldout_change": [-i for i in range(n)],
                        "counting_bias": 0.1, "objective": 1.0, "optuna_trial": range(n)})
    front = pareto.front(res)
    assert len(front) == n  # every trial trades learning for held-out change: all on the front
    text = results.describe(cfg, res, front, results.picks(res), {})
    assert len(text) <= 8000 and "more Pareto-optimal trials: see results.csv" in text and "more trials" in text
    assert "### All trials" in text
