"""MLflow: one parent run per sweep, one child run per trial nested under it.

The Tune callback below runs in the sweep's driver process. It finds runs by tags
(`lmm_ray.sweep`, `lmm_ray.trial_id`) rather than keeping a map in memory, so a resumed sweep
re-attaches to its runs instead of duplicating them (the stock MLflowLoggerCallback does not).
Metrics are logged with step = stage (Tune's `training_iteration` restarts at 1 after a restore).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from lmm_ray import results

PARENT = "parent"
CHILD = "trial"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str, artifact_root: str | None = None) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kw = {"artifact_location": Path(artifact_root).resolve().as_uri()} if artifact_root and "://" not in artifact_root else {}
    return c.create_experiment(name, **kw)


def check_reachable(uri: str) -> None:
    """Fail fast (before Ray starts) when the tracking server cannot be reached."""
    from lmm_ray.schema import mask_secrets

    shown = mask_secrets(uri)
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as e:  # noqa: BLE001 - any failure means unreachable
            raise ConnectionError(
                f"MLflow tracking server {shown} is unreachable ({e.__class__.__name__}: {mask_secrets(str(e))}). Start it "
                f"(`mlflow server --host 127.0.0.1 --port 5000`) or set tracking.mlflow_uri to a reachable server "
                "or leave it empty for the sweep's own sqlite store."
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise ConnectionError(f"the sqlite tracking store's folder {folder} cannot be created or written "
                                  f"({probe} is not writable)")
    elif uri.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        try:
            import sqlalchemy

            with sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5}).connect():
                pass
        except Exception as e:  # noqa: BLE001 - a missing driver, a refused connection, bad credentials
            raise ConnectionError(f"the tracking database {shown} cannot be reached "
                                  f"({e.__class__.__name__}: {mask_secrets(str(e)).splitlines()[0][:300]})") from None


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(str(x) if not isinstance(x, dict) else str(x.get("name", x)) for x in v)
        else:
            out[key] = v
    return out


def _params(c, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    existing = c.get_run(run_id).data.params
    # MLflow refuses to change a logged param: log only the new ones (a resume logs the same values).
    new = [Param(k[:250], str(v)[:6000]) for k, v in params.items() if k[:250] not in existing]
    for i in range(0, len(new), 100):
        c.log_batch(run_id, params=new[i : i + 100])


def parent_run(uri: str, experiment: str, sweep: str, config: dict, artifact_root: str | None = None) -> str:
    """The sweep's parent run: found again by tag on --resume, created otherwise."""
    c = client(uri)
    exp = experiment_id(uri, experiment, artifact_root)
    found = c.search_runs([exp], f"tags.`lmm_ray.sweep` = '{sweep}' and tags.`lmm_ray.role` = '{PARENT}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
    else:
        run_id = c.create_run(exp, run_name=sweep, tags={"lmm_ray.sweep": sweep, "lmm_ray.role": PARENT}).info.run_id
    _params(c, run_id, _flat(config))
    return run_id


def finish_parent(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status)


def log_artifact(uri: str, run_id: str, path: str | Path, folder: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), folder)


def child_runs(uri: str, experiment: str, sweep: str) -> list:
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], f"tags.`lmm_ray.sweep` = '{sweep}' and tags.`lmm_ray.role` = '{CHILD}'", max_results=5000)


class TrialLogger(Callback):
    """Tune callback: a child run per trial with params, per-stage metrics, status and stage table."""

    def __init__(self, uri: str, experiment: str, sweep: str, parent_id: str, base_params: dict, stages_total: int,
                 predictions_root: str | None = None):
        self.uri, self.experiment, self.sweep, self.parent_id = uri, experiment, sweep, parent_id
        self.predictions_root = predictions_root  # <sweep>/predictions: each trial's JSONL files, logged at its end
        self.base_params, self.stages_total = base_params, stages_total
        self._runs: dict[str, str] = {}
        self._rows: dict[str, list[dict]] = {}
        self._steps: dict[str, dict[int, float | None]] = {}  # run id -> {stage: objective logged}

    def _run(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        c = client(self.uri)
        exp = experiment_id(self.uri, self.experiment)
        q = f"tags.`lmm_ray.sweep` = '{self.sweep}' and tags.`lmm_ray.trial_id` = '{trial.trial_id}'"
        found = c.search_runs([exp], q, max_results=1)
        if found:
            run_id = found[0].info.run_id
            c.update_run(run_id, status="RUNNING")
        else:
            tags = {"mlflow.parentRunId": self.parent_id, "lmm_ray.sweep": self.sweep, "lmm_ray.role": CHILD,
                    "lmm_ray.trial_id": trial.trial_id, "lmm_ray.status": "running"}
            name = f"{trial.config.get('recipe', 'trial')}-{trial.trial_id}"
            run_id = c.create_run(exp, run_name=name, tags=tags).info.run_id
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        params = {**self.base_params, **{f"search.{k}": v for k, v in trial.config.items()}}
        params.update({k: v for k, v in trial.config.items() if k in ("recipe", "lr")})
        _params(client(self.uri), run_id, params)

    def _logged_steps(self, run_id: str) -> dict[int, float | None]:
        """{stage: objective} already in the run (read from MLflow once: a resumed sweep's runs have history)."""
        if run_id not in self._steps:
            c = client(self.uri)
            steps: dict[int, float | None] = {m.step: m.value for m in c.get_metric_history(run_id, "objective")}
            for m in c.get_metric_history(run_id, "stage"):
                steps.setdefault(m.step, None)
            self._steps[run_id] = steps
        return self._steps[run_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self._run(trial)
        step = int(result.get("stage", 0))
        # A trial restarted after its last checkpoint (a resumed sweep, a retried trial) reports that
        # stage again with the same values: log it once, so the history keeps one point per stage.
        # A stage that was really trained again (its checkpoint was lost) has new values and is logged.
        logged = self._logged_steps(run_id)
        obj = result.get("objective")
        obj = float(obj) if isinstance(obj, (int, float)) and math.isfinite(float(obj)) else None
        if step in logged and (logged[step] == obj or (obj is not None and logged[step] is not None
                                                       and math.isclose(logged[step], obj, rel_tol=1e-9, abs_tol=1e-12))):
            return
        logged[step] = obj
        ts = int(result.get("timestamp", 0) * 1000)
        metrics = [Metric(k.replace("@", "_"), float(v), ts, step) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                   and not k.startswith(("config/", "time_", "timestamp", "pid", "training_iteration", "iterations_since"))]
        c = client(self.uri)
        for i in range(0, len(metrics), 500):
            c.log_batch(run_id, metrics=metrics[i : i + 500])
        if "trainable" in result:  # trainable count per role, as params (_params skips those already logged)
            _params(c, run_id, {k: result[k] for k in result if k.startswith("roles/") or k in ("trainable", "total_params")})

    def _end(self, trial, status: str, reason: str, mlflow_status: str):
        c = client(self.uri)
        run_id = self._run(trial)
        c.set_tag(run_id, "lmm_ray.status", status)
        if reason:
            c.set_tag(run_id, "lmm_ray.reason", reason[:5000])
        hist = self.stage_table(trial)
        if hist is not None and len(hist):
            buf = io.StringIO()
            hist.to_csv(buf, index=False)
            c.log_text(run_id, buf.getvalue(), "stage_table.csv")
        preds = Path(self.predictions_root) / trial.trial_id if self.predictions_root else None
        if preds is not None and preds.is_dir():
            c.log_artifacts(run_id, str(preds), "predictions")
        c.set_terminated(run_id, mlflow_status)

    def stage_table(self, trial):
        path = os.path.join(trial.local_path or "", "progress.csv") if getattr(trial, "local_path", None) else None
        if path and os.path.exists(path):
            df = pd.read_csv(path)
            keep = [c for c in df.columns if c == "stage" or c.startswith(("target/", "heldout/", "probe/")) or c in ("learning", "heldout_change", "counting_bias", "objective")]
            return df[keep].drop_duplicates("stage", keep="last")
        return None

    def on_trial_complete(self, iteration, trials, trial, **info):
        status, reason = results.trial_status(trial.last_result or {}, self.stages_total)
        self._end(trial, status, reason, "FAILED" if status == "failed" else "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        err = getattr(trial, "error_file", None) or ""
        self._end(trial, "failed", f"trial raised an error (see {err})" if err else "trial raised an error", "FAILED")


def log_summary(uri: str, parent_id: str, files, best, front_size: int) -> None:
    """The sweep's tables and plots as artifacts of its parent run, with the best trial."""
    for f in files:
        log_artifact(uri, parent_id, f)
    c = client(uri)
    c.log_metric(parent_id, "best_objective", float(best["objective"]))
    c.log_metric(parent_id, "front_size", front_size)
    c.set_tag(parent_id, "best_trial", str(best["trial_id"]))


def results_from_mlflow(uri: str, experiment: str, sweep: str) -> pd.DataFrame:
    """The results table (results.result_row per trial) rebuilt from the child runs, for sweeps
    whose results.csv is gone or was never written (a killed driver)."""
    rows = []
    for r in child_runs(uri, experiment, sweep):
        p, m, t = r.data.params, r.data.metrics, r.data.tags
        config = {"recipe": p.get("recipe"), "lr": p.get("lr", "nan"),
                  **{k[len("search."):]: v for k, v in p.items() if k.startswith("search.") and k not in ("search.recipe", "search.lr")}}
        rows.append(results.result_row(t.get("lmm_ray.trial_id"), t.get("lmm_ray.status", "running"),
                                       t.get("lmm_ray.reason", ""), config, m))
    return pd.DataFrame(rows)
