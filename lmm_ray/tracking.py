"""MLflow: one parent run per sweep, one child run per trial nested under it.

What goes where (docs/architecture.md, "MLflow: what a sweep logs"):
- the parent run: the sweep's resolved config as params (once), the step -> skill map, and at the
  end the tables and plots as artifacts, the results and Pareto tables as its description, the
  best run's id and the front's size and hypervolume (logged again only when they change);
- a child run per trial, named `<recipe> lr=<lr> #<optuna trial>`: the sampled values and the
  recipe's constants (trainable counts) as params, once; per-stage metrics with step = stage
  (step 0 = the base, so a chart starts where the model started), named with one slash level
  (`mlflow_name`); tags that link the trial's names (Tune id, Optuna number) and, once the sweep
  ends, mark the Pareto-optimal trials and the picks.

The Tune callback below runs in the sweep's driver process. It finds runs by tags
(`lmm_ray.sweep`, `lmm_ray.trial_id`) rather than keeping a map in memory, so a resumed sweep
re-attaches to its runs instead of duplicating them (the stock MLflowLoggerCallback does not).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from lmm_ray import pareto, results

PARENT = "parent"
CHILD = "trial"
NOTE = "mlflow.note.content"  # a run's description (markdown) in the MLflow UI
# Tags on trial runs once the sweep has ended (the Pareto front in MLflow).
PARETO_TAG, PICK_TAG = "pareto_optimal", "pick"


def client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." at INFO when a sweep's sqlite store is new
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens a GenAI experiment on its traces; this kind opens ours on the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(uri: str, name: str, artifact_root: str | None = None) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    kw = {"artifact_location": Path(artifact_root).resolve().as_uri()} if artifact_root and "://" not in artifact_root else {}
    return c.create_experiment(name, tags=dict([EXPERIMENT_KIND]), **kw)


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


# ---------------------------------------------------------------------------------------------
# Names and values as MLflow shows them


# Trial-level numbers kept at the top level: MLflow's "Model metrics" section holds just these.
TOP_LEVEL = ("learning", "target_forgetting", "heldout_change", "counting_bias", "objective")
# Per-stage metrics under other names (the rest of a name with two slash levels loses its `/acc`).
RENAMED = {
    "target/mean_acc": "target/mean",
    "heldout/mean_acc": "heldout/mean",
    "heldout_change_worst": "heldout/change_worst",
    "train_loss_first": "train/loss_first",
    "train_loss_last": "train/loss_last",
    "stage_train_seconds": "train/seconds",
    "stage_steps": "train/steps",
}
# Equal, at the last stage, to a per-stage metric that is logged (heldout/change,
# probe/number_mass_change, probe/kl_base): logged per stage they would not be "final".
FINAL_ALIASES = {"heldout_change_final": "heldout/change", "counting_bias_final": "probe/number_mass_change",
                 "kl_base": "probe/kl_base"}


def mlflow_name(key: str) -> str | None:
    """The MLflow name of a per-stage metric, or None for what is not logged as a metric.

    MLflow groups charts by the part before the first slash, so names keep one slash level:
    `target/<skill>/acc` -> `target/<skill>`, `heldout/<set>/acc` -> `heldout/<set>` (another
    metric of a set: `heldout/<set>_<metric>`), `probe/*` unchanged. Constants (stage counters,
    trainable counts) are params, not metrics; Tune's own keys are dropped.
    """
    if key in TOP_LEVEL:
        return key
    if key in RENAMED:
        return RENAMED[key]
    parts = key.split("/")
    if parts[0] not in ("target", "heldout", "probe") or len(parts) < 2:
        return None
    if len(parts) > 2 and parts[-1] == "acc":
        parts = parts[:-1]
    return parts[0] + "/" + "_".join(parts[1:])


def readable(v: float) -> float:
    """4 significant digits: what a chart or a table cell can show (accuracies like 43.75)."""
    return float(f"{v:.4g}")


def fmt_value(v) -> str:
    """A param as a person reads it: learning rates like 1.62e-4, other floats to 4 digits."""
    if isinstance(v, float):
        from lmm_ray.pareto import fmt_lr

        return fmt_lr(v) if 0 < abs(v) < 1e-2 else f"{v:.4g}"
    return str(v)


def stage_metrics(result: dict, base: dict | None) -> dict[str, float]:
    """The MLflow metrics of one stage's result (or of the base, as step 0)."""
    out = {}
    for k, v in result.items():
        name = mlflow_name(k)
        if name and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[name] = readable(float(v))
    if base and "heldout/mean_acc" in result and "heldout/mean_acc" in base:
        # the held-out change of this stage alone, beside `heldout_change` (the mean over stages so far)
        out["heldout/change"] = readable(result["heldout/mean_acc"] - base["heldout/mean_acc"])
    return out


def base_step(base: dict) -> dict[str, float]:
    """Step 0 of every trial: the base model's metrics, and 0 for every change from the base."""
    zero = {k: 0.0 for k in TOP_LEVEL} | {"heldout/change_worst": 0.0}
    return zero | stage_metrics(base, base)


def run_name(config: dict, optuna_number: int | None) -> str:
    name = f"{config.get('recipe', 'trial')} lr={fmt_value(float(config['lr']))}" if "lr" in config else str(config.get("recipe", "trial"))
    return name + (f" #{optuna_number}" if optuna_number is not None else "")


# ---------------------------------------------------------------------------------------------
# Runs


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


def step_skills(stage_names) -> str:
    """`0 base, 1 count, 2 clock`: what each MLflow step (= stage) of a trial run means."""
    return ", ".join(["0 base", *(f"{i} {n}" for i, n in enumerate(stage_names, start=1))])


def parent_run(uri: str, experiment: str, sweep: str, config: dict, artifact_root: str | None = None) -> str:
    """The sweep's parent run: found again by tag on --resume, created otherwise. The sweep's
    config is logged here only (its trials log what they sampled)."""
    c = client(uri)
    exp = experiment_id(uri, experiment, artifact_root)
    found = c.search_runs([exp], f"tags.`lmm_ray.sweep` = '{sweep}' and tags.`lmm_ray.role` = '{PARENT}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
    else:
        run_id = c.create_run(exp, run_name=sweep, tags={"lmm_ray.sweep": sweep, "lmm_ray.role": PARENT}).info.run_id
    stages = [s.get("name", s.get("skill", "?")) if isinstance(s, dict) else str(s) for s in config.get("stages", [])]
    _params(c, run_id, {**_flat(config), "step_to_skill": step_skills(stages)})
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


class Links:
    """One trial, three names: Tune's trial id -> its Optuna trial number (filled by the searcher,
    sweep.StageAwareOptunaSearch) and -> its MLflow run id (filled by TrialLogger). Both live in
    the sweep's driver process; each reads what the other wrote."""

    def __init__(self):
        self.optuna: dict[str, int] = {}
        self.runs: dict[str, str] = {}


LINKS = Links()


class TrialLogger(Callback):
    """Tune callback: a child run per trial with params, per-stage metrics, status and stage table."""

    def __init__(self, uri: str, experiment: str, sweep: str, parent_id: str, stages_total: int,
                 base_metrics: dict | None = None, stage_names=(), predictions_root: str | None = None):
        self.uri, self.experiment, self.sweep, self.parent_id = uri, experiment, sweep, parent_id
        self.stages_total, self.base_metrics, self.stage_names = stages_total, base_metrics, tuple(stage_names)
        self.predictions_root = predictions_root  # <sweep>/predictions: each trial's JSONL files, logged at its end
        self._runs: dict[str, str] = {}
        self._steps: dict[str, dict[int, float | None]] = {}  # run id -> {stage: objective logged}

    def _run(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        c = client(self.uri)
        exp = experiment_id(self.uri, self.experiment)
        q = f"tags.`lmm_ray.sweep` = '{self.sweep}' and tags.`lmm_ray.trial_id` = '{trial.trial_id}'"
        found = c.search_runs([exp], q, max_results=1)
        if found:  # a resumed sweep (or a retried trial): the same run, running again
            run_id = found[0].info.run_id
            c.update_run(run_id, status="RUNNING")
            if found[0].data.tags.get("lmm_ray.status") != "running":
                c.set_tag(run_id, "lmm_ray.status", "running")
        else:
            number = LINKS.optuna.get(trial.trial_id)
            config = dict(trial.config or {})
            tags = {"mlflow.parentRunId": self.parent_id, "lmm_ray.sweep": self.sweep, "lmm_ray.role": CHILD,
                    "lmm_ray.trial_id": trial.trial_id, "lmm_ray.status": "running",
                    "lmm_ray.config": json.dumps(config, default=str)}  # the exact sampled values
            if number is not None:
                tags["lmm_ray.optuna_trial"] = str(number)
            steps = step_skills(getattr(self, "stage_names", ()))
            tags[NOTE] = (f"Trial `{trial.trial_id}` (Tune) = Optuna trial {number if number is not None else '?'}. "
                          f"Steps: {steps}.")
            run_id = c.create_run(exp, run_name=run_name(config, number), tags=tags).info.run_id
            self._steps[run_id] = {}  # a new run has no history to read back
        self._runs[trial.trial_id] = run_id
        LINKS.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        params = {k: fmt_value(v) for k, v in (trial.config or {}).items()}
        base = getattr(self, "base_metrics", None)
        if base and self._steps.get(run_id) == {}:  # a run created just now: params and step 0 in one call
            self._log_step(run_id, 0, base_step(base), 0, params)
            return
        _params(client(self.uri), run_id, params)  # a run found again: only the params it lacks
        if base and 0 not in self._logged_steps(run_id):
            self._log_step(run_id, 0, base_step(base), 0)

    def _logged_steps(self, run_id: str) -> dict[int, float | None]:
        """{stage: objective} already in the run (read from MLflow once: a resumed sweep's runs have history)."""
        if run_id not in self._steps:
            c = client(self.uri)
            self._steps[run_id] = {m.step: m.value for m in c.get_metric_history(run_id, "objective")}
        return self._steps[run_id]

    def _log_step(self, run_id: str, step: int, metrics: dict[str, float], ts: int, params=None, tags=None) -> None:
        """One stage in one MLflow call where it fits (Tune warns when a callback takes > 0.5 s)."""
        from mlflow.entities import Metric, Param, RunTag

        self._logged_steps(run_id)[step] = metrics.get("objective")
        batch = [Metric(k, v, ts, step) for k, v in metrics.items()]
        extra = {"params": [Param(k[:250], str(v)[:6000]) for k, v in (params or {}).items()],
                 "tags": [RunTag(k, str(v)) for k, v in (tags or {}).items()]}
        c = client(self.uri)
        for i in range(0, max(1, len(batch)), 500):
            c.log_batch(run_id, metrics=batch[i : i + 500], **(extra if i == 0 else {}))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run(trial)
        step = int(result.get("stage", 0))
        metrics = stage_metrics(result, getattr(self, "base_metrics", None))
        # A trial restarted after its last checkpoint (a resumed sweep, a retried trial) reports that
        # stage again with the same values: log it once, so the history keeps one point per stage.
        # A stage that was really trained again (its checkpoint was lost) has new values and is logged.
        logged = self._logged_steps(run_id)
        obj = metrics.get("objective")
        if step in logged and (logged[step] == obj or (obj is not None and logged[step] is not None
                                                       and math.isclose(logged[step], obj, rel_tol=1e-9, abs_tol=1e-12))):
            return
        params, sized = {}, self.__dict__.setdefault("_sized", set())
        if "trainable" in result and run_id not in sized:  # the recipe's size: constant per trial: params, once
            have = client(self.uri).get_run(run_id).data.params
            params = {k: fmt_value(v) if k == "trainable_share" else v for k, v in result.items()
                      if (k.startswith("roles/") or k in results.SIZE_COLUMNS) and k not in have}
            sized.add(run_id)
        self._log_step(run_id, step, metrics, int(result.get("timestamp", 0) * 1000), params,
                       {"lmm_ray.stages_completed": step})

    def _end(self, trial, status: str, reason: str, mlflow_status: str, error_text: str = ""):
        from mlflow.entities import RunTag

        c = client(self.uri)
        run_id = self._run(trial)
        c.log_batch(run_id, tags=[RunTag("lmm_ray.status", status)] + ([RunTag("lmm_ray.reason", reason[:5000])] if reason else []))
        if error_text:  # the whole error in the run itself, not only in a Ray session folder under /tmp
            c.log_text(run_id, error_text, "error.txt")
        hist = self.stage_table(trial)
        if hist is not None and len(hist):
            buf = io.StringIO()
            hist.to_csv(buf, index=False, float_format="%.4g")
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
        error = trial_error(trial)
        reason = results.failure_reason(error) if error is not None else ""
        text = results.ANSI.sub("", str(error)) if error is not None else ""
        self._end(trial, "failed", reason or "the trial raised an error (error.txt in its Tune folder)", "FAILED", text)


def trial_error(trial):
    """A Tune trial's last error: the exception itself where Tune could pickle it, else its text.
    When on_trial_error runs, Tune has written them to the driver's staging folder only (the
    sweep's storage gets them at the next sync), so that copy is read first."""
    from ray import cloudpickle

    for path, read in ((getattr(trial, "pickled_error_file", None), lambda f: cloudpickle.loads(Path(f).read_bytes())),
                       (getattr(trial, "error_file", None), lambda f: Path(f).read_text()),
                       (True, lambda _: trial.get_pickled_error() or trial.get_error())):
        try:
            error = read(path) if path else None
        except Exception:  # noqa: BLE001 - unreadable: the reason says the trial failed, no more
            error = None
        if error:
            return error
    return None


def close_interrupted(uri: str, experiment: str, sweep: str, parent_id: str) -> int:
    """Ctrl-C: the sweep's run and its trials that were running end KILLED (not FINISHED), tagged
    `interrupted`; `--resume` sets them running again. Returns how many trial runs were closed."""
    c = client(uri)
    n = 0
    for run in child_runs(uri, experiment, sweep):
        if run.info.status == "RUNNING":
            c.set_tag(run.info.run_id, "lmm_ray.status", "interrupted")
            c.set_terminated(run.info.run_id, "KILLED")
            n += 1
    c.set_terminated(parent_id, "KILLED")
    return n


def settle_runs(uri: str, experiment: str, sweep: str, res: pd.DataFrame) -> None:
    """Every trial run ends as its trial did, whatever the driver lived through. A driver killed
    between Tune saving a trial's end and this callback logging it leaves a run RUNNING that no
    resumed trial re-attaches to; a run created after Tune's last save belongs to a trial no resume
    knows (`lost`, KILLED)."""
    from mlflow.entities import RunTag

    c = client(uri)
    rows = {str(r.trial_id): r for r in res.itertuples()}
    for run in child_runs(uri, experiment, sweep):
        row = rows.get(run.data.tags.get("lmm_ray.trial_id", ""))
        if row is None:
            if run.info.status == "RUNNING":
                c.log_batch(run.info.run_id, tags=[RunTag("lmm_ray.status", "lost"), RunTag(
                    "lmm_ray.reason", "its driver was killed before Tune saved the trial, so no resume runs it")])
                c.set_terminated(run.info.run_id, "KILLED")
            continue
        want = {"lmm_ray.status": row.status, **({"lmm_ray.reason": str(row.reason)[:5000]} if row.status == "failed" else {})}
        tags = [RunTag(k, v) for k, v in want.items() if run.data.tags.get(k) != v]
        if tags:
            c.log_batch(run.info.run_id, tags=tags)
        status = "FAILED" if row.status == "failed" else "FINISHED"
        if run.info.status != status:
            c.set_terminated(run.info.run_id, status)


# ---------------------------------------------------------------------------------------------
# The sweep's result in MLflow


def trial_run_ids(uri: str, experiment: str, sweep: str) -> dict[str, str]:
    """Tune trial id -> MLflow run id of the sweep's trial runs."""
    return {r.data.tags.get("lmm_ray.trial_id"): r.info.run_id for r in child_runs(uri, experiment, sweep)}


def tag_trials(uri: str, experiment: str, sweep: str, front_ids, picks: dict[str, str]) -> dict[str, str]:
    """Mark the trial runs: `pareto_optimal` true/false on each, `pick` (e.g. "knee, max-learning")
    on the picked ones and removed from the others (a re-run may pick differently). Returns the
    trial id -> run id map."""
    c = client(uri)
    on = set(map(str, front_ids))
    runs = child_runs(uri, experiment, sweep)
    for r in runs:
        tid = r.data.tags.get("lmm_ray.trial_id")
        want = {PARETO_TAG: "true" if tid in on else "false"}
        chosen = ", ".join(how for how, t in picks.items() if str(t) == tid)
        if chosen:
            want[PICK_TAG] = chosen
        elif PICK_TAG in r.data.tags:
            c.delete_tag(r.info.run_id, PICK_TAG)
        for k, v in want.items():
            if r.data.tags.get(k) != v:
                c.set_tag(r.info.run_id, k, v)
    return {r.data.tags.get("lmm_ray.trial_id"): r.info.run_id for r in runs}


def log_summary(uri: str, parent_id: str, files, description: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """The sweep's tables and plots as artifacts of its parent run, its description (markdown),
    and summary metrics and tags. A metric whose latest value is unchanged is not logged again,
    so a re-run of a finished sweep leaves the parent's history as it was."""
    for f in files:
        log_artifact(uri, parent_id, f)
    c = client(uri)
    have = c.get_run(parent_id).data
    for k, v in metrics.items():
        v = readable(float(v))
        if math.isfinite(v) and not (k in have.metrics and math.isclose(have.metrics[k], v, rel_tol=1e-9, abs_tol=1e-12)):
            c.log_metric(parent_id, k, v)
    for k, v in {**tags, NOTE: description}.items():
        if have.tags.get(k) != v:
            c.set_tag(parent_id, k, v)


def log_result(cfg, parent: str, res: pd.DataFrame, front: pd.DataFrame, files) -> None:
    """The Pareto front in MLflow: tags on the trial runs (Pareto-optimal, picks), the tables as the
    parent run's description, the best run's id, the front's size and hypervolume."""
    chosen = results.picks(res)
    run_ids = tag_trials(cfg.mlflow_uri, cfg.experiment, cfg.name, front["trial_id"], chosen)
    names = {r.data.tags.get("lmm_ray.trial_id"): r.info.run_name
             for r in child_runs(cfg.mlflow_uri, cfg.experiment, cfg.name)}
    best = results.finished_best(res)
    ref = results.reference(cfg.objective)
    metrics = {"best_objective": best["objective"], "front_size": len(front),
               "hypervolume": pareto.front_hypervolume(res, ref=ref)}
    tags = {"best_trial": str(best["trial_id"]), "best_run_id": run_ids.get(str(best["trial_id"]), ""),
            **{f"pick.{how}": run_ids.get(t, "") for how, t in chosen.items()}}
    log_summary(cfg.mlflow_uri, parent, files, results.describe(cfg, res, front, chosen, names), metrics, tags)


def results_from_mlflow(uri: str, experiment: str, sweep: str) -> pd.DataFrame:
    """The results table (results.result_row per trial) rebuilt from the child runs, for sweeps
    whose results.csv is gone or was never written (a killed driver)."""
    rows = []
    for r in child_runs(uri, experiment, sweep):
        p, m, t = r.data.params, dict(r.data.metrics), r.data.tags
        if "lmm_ray.config" in t:  # the exact sampled values (params show them rounded)
            config = json.loads(t["lmm_ray.config"])
        else:  # runs logged before the config tag: search.* params
            config = {"recipe": p.get("recipe"), "lr": p.get("lr", "nan"),
                      **{k[len("search."):]: v for k, v in p.items() if k.startswith("search.") and k not in ("search.recipe", "search.lr")}}
        for agg, name in FINAL_ALIASES.items():
            m.setdefault(agg, m.get(name, float("nan")))
        m.setdefault("heldout_change_worst", m.get("heldout/change_worst", float("nan")))
        for k in results.SIZE_COLUMNS:
            if k in p:
                m.setdefault(k, float(p[k]))
        if "lmm_ray.stages_completed" in t:
            m["stage"] = int(t["lmm_ray.stages_completed"])
        row = results.result_row(t.get("lmm_ray.trial_id"), t.get("lmm_ray.status", "running"), t.get("lmm_ray.reason", ""), config, m)
        if "lmm_ray.optuna_trial" in t:
            row["optuna_trial"] = int(t["lmm_ray.optuna_trial"])
        rows.append(row)
    return pd.DataFrame(rows)
