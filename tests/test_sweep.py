"""Sweeps end to end: `lmm-ray sweep` in a subprocess on the ci base (Ray Tune + Train V2 + Optuna +
MLflow), then the files, the MLflow runs and the Optuna study it leaves behind.

Few and small: every sweep costs 1-3 min on this 2-core machine (Ray start-up and ~15-20 s per
trial dominate; each stage trains 5 steps and evaluates 8 samples per skill).
  - a multi-objective NSGA-II sweep (2 trials): tracking layout, result files, the Optuna study;
  - a sweep killed with SIGKILL after its first trial, then `--resume`d;
  - a single-objective sweep with ASHA on the stage counter (3 trials).
The three sweeps start together, at the module's first test (`shared_sweeps`): a sweep mostly
waits (process and Ray start-ups, Tune), so three at once fill the 2 cores. Each is checked by
many tests on its outputs (module fixtures run it once).
  - multi-objective and ASHA: both on the session's shared Ray cluster (conftest `ray_cluster`,
    `--address`), no Ray start-up of their own, one trial each at a time (the cluster's 2 CPUs).
    Their processes start together, as two users' sweeps on one cluster can. Ray stages a Tune
    run's driver files by start second and experiment name, and cluster.own_staging_folder keeps
    them apart (before it, two sweeps whose Tuners started in the same second wrote each other's
    trials and one hung); whether the Tuners meet in one second here depends on timing, so the
    mechanism has its own test (test_cluster, ..._stage_their_driver_files_apart);
  - kill-and-resume: on a local Ray of its own (the test kills the driver's whole process group,
    Ray included); its first half (run until the first trial is complete, then SIGKILL) runs in a
    thread. It covers how `sweep.init_ray` starts a local Ray.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from lmm_ray import cli, pareto, tracking

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
S = 2  # stages in smoke.yaml
SMALL = ["stages.0.steps=5", "stages.1.steps=5", "train.n_train=32", "eval.n_per_skill=8", "search.max_concurrent=1"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_WAIT_POLICY="PASSIVE")
    return env


def _argv(storage: Path, name: str, *overrides: str, resume: bool = False, address: str | None = None) -> list[str]:
    return [sys.executable, "-m", "lmm_ray.cli", "sweep", str(SMOKE), f"storage={storage}", f"name={name}",
            *SMALL, *overrides, *(["--resume"] if resume else []), *(["--address", address] if address else [])]


def _start(storage: Path, name: str, *overrides: str, resume: bool = False, log: str = "sweep",
           address: str | None = None) -> subprocess.Popen:
    out = open(storage / f"{name}.{log}.log", "w")
    # Own process group: the test can kill the sweep with everything it started (Ray included, when
    # it started its own; a sweep on the shared cluster (address) only has its driver in the group).
    return subprocess.Popen(_argv(storage, name, *overrides, resume=resume, address=address), cwd=ROOT, env=_env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()
    deadline = time.time() + 30
    while time.time() < deadline:  # every process of the group (driver, raylet, GCS, workers) is gone
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes of the killed sweep's group {p.pid} are still alive")


def _log(storage: Path, name: str, log: str = "sweep") -> str:
    return (storage / f"{name}.{log}.log").read_text(errors="replace")


def run_sweep(storage: Path, name: str, *overrides: str, resume: bool = False, timeout: float = 480, log: str = "sweep"):
    return wait_sweep(_start(storage, name, *overrides, resume=resume, log=log), storage, name, timeout=timeout, log=log)


def wait_sweep(p: subprocess.Popen, storage: Path, name: str, *, timeout: float = 480, log: str = "sweep") -> str:
    """Wait for a started sweep; its console log, or an AssertionError (exit code, time-out) with its tail."""
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        raise AssertionError(f"sweep {name} ran over {timeout} s:\n{_log(storage, name, log)[-6000:]}") from None
    text = _log(storage, name, log)
    assert rc == 0, f"sweep {name} exited {rc}:\n{text[-6000:]}"
    return text


def mlflow_client(sweep_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}")


def sweep_runs(sweep_dir: Path, name: str):
    """(parent runs, child runs) of a sweep: every run of its experiment, split by role tag."""
    c = mlflow_client(sweep_dir)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lmm_ray.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("lmm_ray.role") == "trial"]
    assert len(parents) + len(children) == len(runs), [r.data.tags for r in runs]
    return parents, children


def history(c, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def results(sweep_dir: Path) -> pd.DataFrame:
    return pd.read_csv(sweep_dir / "results.csv", dtype={"trial_id": str})


def trial_dirs(sweep_dir: Path) -> dict[str, Path]:
    """Tune trial id -> the trial's Tune folder (`tune/trial_<id>_...`)."""
    return {Path(p).name.split("_")[1]: Path(p) for p in glob.glob(str(sweep_dir / "tune" / "trial_*"))}


def tune_states(sweep_dir: Path) -> dict[str, str]:
    """Trial id -> status as saved in Tune's latest experiment state (what a restore starts from)."""
    files = sorted(glob.glob(str(sweep_dir / "tune" / "experiment_state-*.json")), key=os.path.getmtime)
    if not files:
        return {}
    try:
        data = json.loads(Path(files[-1]).read_text())
    except (OSError, ValueError):  # being written
        return {}
    states = {}
    for entry in data.get("trial_data", []):
        t = json.loads(entry[0])
        states[t["trial_id"]] = t["status"]
    return states


@pytest.fixture(scope="module")
def storage(tmp_path_factory, ci_base):
    # ci_base: the base model is built (once, cached) before any sweep starts, not inside Ray.
    return tmp_path_factory.mktemp("sweeps")


# ---------------------------------------------------------------------------------------------
# 1 + 3: a multi-objective sweep (NSGA-II, 2 trials): tracking layout, files, the Optuna study


MULTI = ("objective.mode=multi", "search.algorithm=nsga2", "search.population_size=2", "search.num_trials=2")
ASHA = ("search.num_trials=3", "scheduler.type=asha", "scheduler.grace_period=1")


@pytest.fixture(scope="module")
def shared_sweeps(storage, ray_cluster):
    """Every sweep of this module, started together at its first test: the multi-objective sweep
    (on the shared cluster) and the ASHA sweep (waited for by `multi` and `asha`), and the first half
    of the kill-and-resume test, in a thread (a Future: `test_resume_after_kill`). Their time-outs
    count from here (`t0`): three sweeps share the 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    procs = {"multi": _start(storage, "multi", *MULTI, address=ray_cluster.address),
             "asha": _start(storage, "asha", *ASHA, address=ray_cluster.address)}
    pool = ThreadPoolExecutor(1)
    try:
        yield {**procs, "resume": pool.submit(run_until_first_trial_then_kill, storage, "resume"), "t0": time.time()}
    finally:
        pool.shutdown(wait=True)  # the thread always ends: it kills its sweep or hits its deadline
        for p in procs.values():  # a failed test must not leave a sweep running
            if p.poll() is None:
                _kill_group(p)


@pytest.fixture(scope="module")
def multi(storage, shared_sweeps):
    name = "multi"
    text = wait_sweep(shared_sweeps[name], storage, name, timeout=max(1.0, shared_sweeps["t0"] + 720 - time.time()))
    return SimpleNamespace(name=name, dir=storage / name, log=text)


@pytest.fixture(scope="module")
def asha(storage, shared_sweeps):
    name = "asha"
    text = wait_sweep(shared_sweeps[name], storage, name, timeout=max(1.0, shared_sweeps["t0"] + 720 - time.time()))
    return SimpleNamespace(name=name, dir=storage / name, log=text)


def test_sweep_writes_result_tables_and_plots(multi):
    res = results(multi.dir)
    assert len(res) == 2 and set(res["status"]) == {"finished"}, res
    assert (res["stages_completed"] == S).all()
    for col in ("learning", "heldout_change", "counting_bias", "objective", "trainable"):
        assert res[col].notna().all(), col
    st = pd.read_csv(multi.dir / "stages.csv", dtype={"trial_id": str})
    assert sorted(st.groupby("trial_id")["stage"].apply(list).map(sorted).tolist()) == [[0, 1, 2], [0, 1, 2]]
    front = pd.read_csv(multi.dir / "pareto.csv", dtype={"trial_id": str})
    assert len(front) >= 1 and set(front["trial_id"]) <= set(res["trial_id"])
    assert (front["status"] == "finished").all()
    assert (multi.dir / "tradeoff.png").stat().st_size > 1000
    assert (multi.dir / "heldout_by_stage.png").stat().st_size > 1000


def test_mlflow_one_parent_and_a_nested_child_per_trial(multi):
    parents, children = sweep_runs(multi.dir, multi.name)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    res = results(multi.dir).set_index("trial_id")
    c = mlflow_client(multi.dir)
    assert {r.data.tags["lmm_ray.trial_id"] for r in children} == set(res.index)
    base = json.loads((multi.dir / "base_eval.json").read_text())["metrics"]
    for run in children:
        tid, tags, params, metrics = run.data.tags["lmm_ray.trial_id"], run.data.tags, run.data.params, run.data.metrics
        row = res.loc[tid]
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and tags["lmm_ray.status"] == "finished"
        # one name per trial: recipe, lr and the Optuna number in the run name; Tune's id and the number as tags
        assert run.info.run_name == f"{row['recipe']} lr={pareto.fmt_lr(row['lr'])} #{row['optuna_trial']}"
        assert tags["lmm_ray.optuna_trial"] == str(row["optuna_trial"])
        # per-stage metrics: one point per stage, step 0 = the base; names with one slash level
        for key in ("heldout/mean", "objective", "learning", "heldout_change", "heldout/change", "counting_bias", "target/count"):
            assert [s for s, _ in history(c, run.info.run_id, key)] == list(range(0, S + 1)), key
        assert history(c, run.info.run_id, "heldout/mean")[0] == (0, pytest.approx(base["heldout/mean_acc"], abs=0.01))
        assert history(c, run.info.run_id, "learning")[0] == (0, 0.0)
        assert history(c, run.info.run_id, "learning")[-1][1] == pytest.approx(row["learning"], rel=1e-3, abs=0.01)
        assert all(k.count("/") <= 1 for k in metrics), sorted(metrics)
        assert not {"stage", "stages_total", "trainable", "total_params", "trainable_share", "timesteps_total",
                    "heldout_change_final"} & set(metrics)
        assert not [k for k in metrics if k.startswith("roles/")]
        # params: the sampled values (once, readable), the recipe's sizes; the sweep config is the parent's
        assert params["recipe"] == row["recipe"] and params["lr"] == pareto.fmt_lr(row["lr"])
        assert json.loads(tags["lmm_ray.config"])["lr"] == pytest.approx(row["lr"], rel=1e-12)
        assert not [k for k in params if k.startswith(("sweep.", "search."))], sorted(params)
        assert int(params["trainable"]) == row["trainable"] > 0
        roles = {k: int(v) for k, v in params.items() if k.startswith("roles/")}
        assert roles and sum(roles.values()) == int(params["trainable"]), roles
        # the Pareto front in MLflow
        front = set(pd.read_csv(multi.dir / "pareto.csv", dtype={"trial_id": str})["trial_id"])
        assert tags["pareto_optimal"] == ("true" if tid in front else "false")
        # the stage table artifact
        assert "stage_table.csv" in [a.path for a in c.list_artifacts(run.info.run_id)]
        table = pd.read_csv(c.download_artifacts(run.info.run_id, "stage_table.csv", str(multi.dir / f"dl_{tid}")))
        assert table["stage"].tolist() == list(range(1, S + 1))
        assert {"heldout/mean_acc", "learning", "objective"} <= set(table.columns)
    picks = {p for r in children for p in r.data.tags.get("pick", "").split(", ") if p}
    assert picks == {"knee", "max-learning", "min-forgetting"}
    # the parent: the sweep config (only here), the stage map, the result as its description
    pp, pt = parent.data.params, parent.data.tags
    assert pp["model"] == "base:qwen2_5_vl@ci" and pp["train.n_train"] == "32" and pp["eval.n_per_skill"] == "8"
    assert pp["objective.mode"] == "multi" and pp["search.algorithm"] == "nsga2"
    assert pp["step_to_skill"] == "0 base, 1 count, 2 clock"
    assert pt["best_run_id"] in {r.info.run_id for r in children}
    assert "### Pareto-optimal trials" in pt["mlflow.note.content"] and "hypervolume" in pt["mlflow.note.content"]
    assert "hypervolume" in parent.data.metrics
    parent_files = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "results.csv", "stages.csv", "tradeoff.png", "heldout_by_stage.png"} <= parent_files, parent_files


def test_predictions_of_every_skill_and_stage_rescore_to_the_logged_value(multi, capsys):
    """Each trial's MLflow run holds <stage>/<skill>.jsonl for the base and every stage, and
    `lmm-ray score` with the records' metric gives back the accuracy the run logged."""
    _, children = sweep_runs(multi.dir, multi.name)
    c = mlflow_client(multi.dir)
    skills = {"count": "target", "clock": "target", "color": "heldout", "shape": "heldout", "presence": "heldout"}
    for run in children:
        tid = run.data.tags["lmm_ray.trial_id"]
        got = c.download_artifacts(run.info.run_id, "predictions", str(multi.dir / f"preds_{tid}"))
        files = sorted(str(p.relative_to(got)) for p in Path(got).rglob("*.jsonl"))
        assert files == sorted(f"stage{s}/{k}.jsonl" for s in range(S + 1) for k in skills), files
        for stage in (0, S):
            for skill, kind in skills.items():
                path = Path(got) / f"stage{stage}" / f"{skill}.jsonl"
                rows = [json.loads(line) for line in path.read_text().splitlines()]
                assert len(rows) == 8 and {"id", "prompt", "prediction", "answers", "choices", "category",
                                            "score"} <= set(rows[0])
                metric = rows[0]["metric"]
                assert cli.main(["score", str(path), "--metric", metric, "--json"]) == 0
                score = json.loads(capsys.readouterr().out)["score"]
                logged = dict(history(c, run.info.run_id, tracking.mlflow_name(f"{kind}/{skill}/acc")))
                assert score == pytest.approx(logged[stage]), (tid, stage, skill)  # stage 0: the base


def test_multi_objective_optuna_study(multi):
    """The OptunaSearch multi-objective path: 3 directions, trials told with the final vector."""
    import optuna

    study = optuna.load_study(study_name=multi.name, storage=f"sqlite:///{multi.dir / 'optuna.db'}")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MAXIMIZE,
                                optuna.study.StudyDirection.MINIMIZE]
    assert study.metric_names == ["learning", "heldout_change", "counting_bias"]  # optuna-dashboard's axes
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 == len(study.trials)
    res = results(multi.dir)
    _, children = sweep_runs(multi.dir, multi.name)
    run_of = {r.data.tags["lmm_ray.trial_id"]: r.info.run_id for r in children}
    for t in done:
        row = res[(res["recipe"] == t.params["recipe"]) & ((res["lr"] - t.params["lr"]).abs() < 1e-12)]
        assert len(row) == 1, (t.params, res[["recipe", "lr"]])
        assert t.values == pytest.approx(row[["learning", "heldout_change", "counting_bias"]].iloc[0].tolist())
        # the three names of one trial, linked: Tune id, MLflow run id, Optuna number
        tid = t.user_attrs["tune_trial_id"]
        assert tid == row["trial_id"].iloc[0] and row["optuna_trial"].iloc[0] == t.number
        assert t.user_attrs["mlflow_run_id"] == run_of[tid]
        assert [t.user_attrs[k] for k in ("learning", "heldout_change", "counting_bias")] == pytest.approx(t.values)


def test_progress_table_shows_only_the_chosen_columns(multi):
    """The live table (legacy engine + CLIReporter) replaces the new engine's dump of every metric."""
    expected = ["Trial name", "status", "loc", "recipe", "lr", "stage", "learning", "heldout_change",
                "counting_bias", "objective"]
    headers = [[c.strip() for c in line.strip("|").split("|")] for line in multi.log.splitlines()
               if line.startswith("| Trial name")]
    assert headers and max(headers, key=len) == expected, headers
    # before the first result the metric columns are still empty, and Tune hides empty columns
    assert all(h == expected[: len(h)] for h in headers), headers
    assert multi.log.count("== Status ==") >= 3  # shown during the run, not only at the end
    assert "heldout/color/acc" not in multi.log  # no per-result dump of every metric
    assert "Reporting training result" not in multi.log


RAY_ERROR_LINE = re.compile(r"\d\d:\d\d:\d\d,\d+ E \d+ \d+\]|\bERROR\b|\bCRITICAL\b")


def test_console_is_quiet_and_ends_with_where_to_look(multi):
    """A healthy sweep prints no traceback, no error-level line, no per-trial PreemptionWatcher
    error, no bar per update; it ends with the MLflow URL, the command and the Optuna dashboard."""
    at = multi.log.find("Traceback")
    assert at < 0, multi.log[max(0, at - 300): at + 3000]  # the traceback itself, not just its first line
    bad = [ln for ln in multi.log.splitlines() if RAY_ERROR_LINE.search(ln)]
    assert not bad, bad
    assert "PreemptionWatcher" not in multi.log and "Loading weights" not in multi.log
    assert "A new study created" not in multi.log and "Result logdir" not in multi.log
    tail = multi.log[multi.log.index(f"== sweep {multi.name}:"):]
    assert "hypervolume" in tail and "reference point (learning 0, held-out change -50, counting bias +0.2" in tail
    assert re.search(r"runs table: http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?workflowType=machine_learning", tail), tail
    assert f"ui {multi.dir}" in tail and f"optuna-dashboard sqlite:///{multi.dir / 'optuna.db'}" in tail


def test_mlflow_ui_lists_the_trial_runs_in_a_browser(multi):
    """scripts/browser_check.py: `lmm-ray ui` on the finished sweep, the printed URL in headless
    Chromium, every trial run's name on the page."""
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")) and not os.environ.get("CHROMIUM"):
        pytest.skip("no Chromium installed (apt-get install chromium): the headless-browser check did not run")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "browser_check.py"), str(multi.dir),
                          "--screenshot", str(multi.dir / "ui.png")], capture_output=True, text=True, timeout=400,
                         cwd=ROOT, env=_env())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "trial runs found 2/2" in out.stdout and "2 matching runs" in out.stdout, out.stdout
    assert (multi.dir / "ui.png").stat().st_size > 10000


def test_front_never_includes_unfinished_trials(multi):
    """The guarantee behind refusing ASHA + multi: trials that did not finish every stage (stopped,
    failed) never reach the front, even when their partial metrics dominate every finished trial."""
    from lmm_ray import config, pareto
    from lmm_ray import results as R

    cfg = config.load_sweep(SMOKE, [f"storage={multi.dir.parent}", f"name={multi.name}"])
    base = json.loads((multi.dir / "base_eval.json").read_text())["metrics"]

    def result(tid: str, stage: int, learning: float, heldout: float, bias: float, error=None):
        rows = [{"stage": s, "stage_skill": cfg.stages[s - 1].name, "heldout/color/acc": 50.0} for s in range(1, stage + 1)]
        last = {"trial_id": tid, "stage": stage, "learning": learning, "heldout_change": heldout,
                "counting_bias": bias, "objective": learning + min(0, heldout) - 100 * bias}
        return SimpleNamespace(config={"recipe": "sa_proj", "lr": 1e-3}, metrics=last, error=error, path=f"/x/trial_{tid}_1",
                               metrics_dataframe=pd.DataFrame(rows) if rows else None)

    fake = [result("fin00001", S, 5.0, -10.0, 0.2), result("fin00002", S, 2.0, -1.0, 0.1),
            result("stop0001", 1, 90.0, 50.0, -0.5),  # stopped after stage 1, dominates both
            result("fail0001", 1, 99.0, 60.0, -0.9, error=RuntimeError("worker died"))]
    res, st = R.collect(fake, cfg, base)
    assert dict(zip(res["trial_id"], res["status"])) == {"fin00001": "finished", "fin00002": "finished",
                                                          "stop0001": "stopped", "fail0001": "failed"}
    front = pareto.front(res)
    assert set(front["trial_id"]) == {"fin00001", "fin00002"}
    # the real sweep's collected results: only finished trials on its front
    real = results(multi.dir)
    assert set(pareto.front(real)["trial_id"]) <= set(real.loc[real["status"] == "finished", "trial_id"])


def test_asha_with_multi_objective_exits_2(capsys, tmp_path):
    rc = cli.main(["sweep", str(SMOKE), f"storage={tmp_path}", "objective.mode=multi", "scheduler.type=asha"])
    assert rc == 2
    assert "asha with objective.mode: multi" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 2: kill -9 after the first trial, then --resume


def run_until_first_trial_then_kill(storage: Path, name: str) -> SimpleNamespace:
    """Start a 2-trial sweep on a local Ray of its own, SIGKILL its process group (Ray included) as
    soon as the first trial is complete in the state a restore starts from, and return what that
    trial left behind. Runs in a thread started with the module's shared sweeps (`shared_sweeps`):
    the kill must come right after the first trial, whatever test is running then."""
    d = storage / name
    p = _start(storage, name, "search.num_trials=2")
    try:
        # 600 s: this sweep shares the 2 cores with the two sweeps on the shared cluster
        first, deadline = None, time.time() + 600
        while first is None:  # the first trial is complete in the state a restore starts from
            assert p.poll() is None, f"sweep exited early ({p.returncode}):\n{_log(storage, name)[-6000:]}"
            assert time.time() < deadline, f"no trial finished in time:\n{_log(storage, name)[-6000:]}"
            done = [t for t, s in tune_states(d).items() if s == "TERMINATED"]
            first = done[0] if done else None
            time.sleep(1)
        _, children = sweep_runs(d, name)
        child = {r.data.tags["lmm_ray.trial_id"]: r for r in children}[first]
        assert child.info.status == "FINISHED" and child.data.tags["lmm_ray.status"] == "finished"
        train_dir = d / "train" / first
        before = {f.name: f.stat().st_mtime_ns for f in train_dir.iterdir()}
        snapshot = (train_dir / "checkpoint_manager_snapshot.json").read_text()
        result_lines = (trial_dirs(d)[first] / "result.json").read_text().splitlines()
        assert len(result_lines) == S
    finally:
        _kill_group(p)
    return SimpleNamespace(first=first, train_dir=train_dir, before=before, snapshot=snapshot, result_lines=result_lines)


def test_resume_after_kill(storage, shared_sweeps, capsys, monkeypatch):
    import ray

    name = "resume"
    d = storage / name
    killed = shared_sweeps[name].result(timeout=900)  # re-raises what failed in the thread
    first, train_dir, before, snapshot, result_lines = (killed.first, killed.train_dir, killed.before, killed.snapshot,
                                                        killed.result_lines)
    assert not (d / "results.csv").exists()  # it really was interrupted

    run_sweep(storage, name, "search.num_trials=2", resume=True, log="resume")

    parents, children = sweep_runs(d, name)
    assert len(parents) == 1 and len(children) == 2, [r.data.tags for r in parents + children]  # no duplicates
    c = mlflow_client(d)
    assert len(history(c, parents[0].info.run_id, "best_objective")) == 1
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["lmm_ray.status"] == "finished"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        # one point per stage, also for the trial that was running when the sweep was killed
        assert [s for s, _ in history(c, run.info.run_id, "objective")] == list(range(0, S + 1))
    # the first trial was not run again: Tune did not restart it, Train wrote no new checkpoint
    assert (trial_dirs(d)[first] / "result.json").read_text().splitlines() == result_lines
    assert {f.name: f.stat().st_mtime_ns for f in train_dir.iterdir()} == before
    assert (train_dir / "checkpoint_manager_snapshot.json").read_text() == snapshot
    res = results(d)
    assert len(res) == 2 and set(res["status"]) == {"finished"} and (res["stages_completed"] == S).all()
    assert first in set(res["trial_id"])

    # a fresh sweep on the existing name is refused (exit 2) before Ray starts
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called"))
    rc = cli.main(["sweep", str(SMOKE), f"storage={storage}", f"name={name}", *SMALL, "search.num_trials=2"])
    assert rc == 2
    assert f"sweep '{name}' already exists" in capsys.readouterr().err
    rc = cli.main(["sweep", str(SMOKE), f"storage={storage}", "name=no_such_sweep", "--resume"])
    assert rc == 2
    assert "--resume: no sweep to resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 4: single objective + ASHA on the stage counter


def test_asha_single_objective(asha):
    name, d = asha.name, asha.dir
    res = results(d)
    assert len(res) == 3
    assert set(res["status"]) <= {"finished", "stopped"}, res[["trial_id", "status", "reason"]]
    for row in res.itertuples():  # status follows the stages completed
        assert row.status == ("finished" if row.stages_completed == S else "stopped"), row
        assert 1 <= row.stages_completed <= S
    _, children = sweep_runs(d, name)
    assert len(children) == 3
    c = mlflow_client(d)
    by_tid = res.set_index("trial_id")
    for run in children:
        row = by_tid.loc[run.data.tags["lmm_ray.trial_id"]]
        assert run.data.tags["lmm_ray.status"] == row["status"]
        assert run.info.status == "FINISHED"
        assert [s for s, _ in history(c, run.info.run_id, "objective")] == list(range(0, int(row["stages_completed"]) + 1))
    front = pd.read_csv(d / "pareto.csv", dtype={"trial_id": str})
    stopped = set(res.loc[res["status"] == "stopped", "trial_id"])
    assert not stopped & set(front["trial_id"])
    # Optuna hears the truth: a stopped trial is PRUNED (its early-stage objective is not a final one)
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{d / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == sorted("COMPLETE" if s == "finished" else "PRUNED" for s in res["status"]), states
    finished = res[res["status"] == "finished"]
    assert sorted(t.value for t in study.trials if t.state.name == "COMPLETE") == pytest.approx(sorted(finished["objective"]))
    assert study.best_trial.value == pytest.approx(finished["objective"].max())
    # the parent's best trial is a finished one
    parents, _ = sweep_runs(d, name)
    assert parents[0].data.tags["best_trial"] in set(finished["trial_id"])
    print(f"ASHA stopped {len(stopped)} of 3 trials: {sorted(stopped)}")


def test_a_space_of_fixed_values_runs_as_one_trial(storage, ray_cluster):
    """Optuna refuses an empty space (after Tune wrote its state, so the name was lost): a space of
    fixed values runs its one configuration through Tune's default search."""
    name = "fixed"
    if (storage / "multi" / "base_eval.json").exists():  # same base and evaluation: the same base results
        (storage / name).mkdir()
        shutil.copy(storage / "multi" / "base_eval.json", storage / name / "base_eval.json")
    text = wait_sweep(_start(storage, name, "search_space.recipe=sa_proj", "search_space.lr=1.0e-3",
                             "search.num_trials=1", address=ray_cluster.address), storage, name)
    assert "one fixed configuration" in text
    res = results(storage / name)
    assert len(res) == 1 and res["status"].tolist() == ["finished"], res[["trial_id", "status", "reason"]]
    assert res["recipe"].tolist() == ["sa_proj"] and res["lr"].tolist() == [1.0e-3]
    _, children = sweep_runs(storage / name, name)
    assert len(children) == 1 and children[0].info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------
# the live progress table's reporter, without Ray


def test_stage_reporter_prints_on_change_and_ranks_only_finished_trials():
    from lmm_ray import config, console

    cfg = config.load_sweep(SMOKE)
    rep = console.make_reporter(cfg)
    rep.setup(metric="objective", mode="max")
    trial = lambda tid, status, stage, obj: SimpleNamespace(  # noqa: E731
        trial_id=tid, status=status, last_result={"stage": stage, "objective": obj} if stage else {})
    a0 = [trial("a", "PENDING", 0, None)]
    assert rep.should_report(a0)  # first look
    assert not rep.should_report(a0)  # nothing new: wait for the heartbeat
    a1 = [trial("a", "RUNNING", 1, 5.0), trial("b", "PENDING", 0, None)]
    assert rep.should_report(a1)  # a stage reported
    assert not rep.should_report(a1, done=True)  # the final table would repeat the last one
    # best so far: only trials through every stage (an early stage's objective is not comparable)
    best, metric = rep._current_best_trial([trial("a", "RUNNING", 1, 5.0), trial("b", "TERMINATED", S, -3.0)])
    assert best.trial_id == "b" and metric == "objective"
    assert list(rep._metric_columns) == ["stage", "learning", "heldout_change", "counting_bias", "objective"]
    assert list(rep._parameter_columns) == ["recipe", "lr"]


def test_worker_env_quiets_ray_train_and_hf_at_the_source(monkeypatch):
    from lmm_ray import sweep

    for k in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(k, raising=False)
    env = sweep.worker_env()
    assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # a user's own choice wins
    assert sweep.worker_env()["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


def test_tune_lines_filtered_drops_the_grid_end_warning_and_raises_the_slow_threshold(monkeypatch):
    """Inside: Optuna's "`Study.stop` ..." (GridSampler, at a grid's end) is dropped, other warnings
    of that logger pass; Tune's slow-operation threshold is 5 s unless TUNE_WARN_THRESHOLD_S is set.
    Outside: both as Ray has them."""
    import logging

    from ray.tune.utils.util import warn_if_slow

    from lmm_ray import console

    log = logging.getLogger("ray.tune.search.optuna.optuna_search")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    log.addHandler(handler)
    monkeypatch.delenv("TUNE_WARN_THRESHOLD_S", raising=False)
    before = warn_if_slow.DEFAULT_THRESHOLD
    try:
        with console.tune_lines_filtered():
            log.warning(RuntimeError("`Study.stop` is supposed to be invoked inside an objective function or a callback."))
            log.warning("another warning")
            assert warn_if_slow.DEFAULT_THRESHOLD == max(before, 5.0)
        log.warning(RuntimeError("`Study.stop` is supposed to be invoked inside an objective function or a callback."))
        assert warn_if_slow.DEFAULT_THRESHOLD == before
        monkeypatch.setenv("TUNE_WARN_THRESHOLD_S", "0.5")  # a user's own threshold wins
        with console.tune_lines_filtered():
            assert warn_if_slow.DEFAULT_THRESHOLD == before
    finally:
        log.removeHandler(handler)
    assert seen == ["another warning", "`Study.stop` is supposed to be invoked inside an objective function or a callback."]
