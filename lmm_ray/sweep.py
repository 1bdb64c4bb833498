"""Build and run (or resume) a sweep: Optuna searches recipes on Ray Tune, each trial a Ray Train run.

The shape follows Ray 2.60's Train V2 (docs/architecture.md, "Ray, Optuna, MLflow"): a Tune trial is a plain
function that builds a `TorchTrainer` and calls `fit()`; workers report once per stage; the
trial function holds no CPU (cluster.TRIAL_DRIVER_RESOURCES), so it never keeps a worker waiting.
The base model is evaluated once per sweep and handed to every trial. After the run, the results
and per-stage tables are written next to the Tune state and the Pareto front is printed and logged
to MLflow. What the console shows while Tune runs is console.py's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pandas as pd
from ray.tune.search.optuna import OptunaSearch

from lmm_ray import cluster, console, objective, results, tracking, ui
from lmm_ray.config import SweepConfig
from lmm_ray.errors import ClusterError, SweepError
from lmm_ray.results import Store
from lmm_ray.schema import is_uri
from lmm_ray.train import BASE_FILE, TRIAL_DATA  # in the sweep's folder too: the base evaluation every trial shares
from lmm_ray.trial import PREDICTIONS, trial_spec

TUNE_DIR = "tune"


# ---------------------------------------------------------------------------------------------
# Ray


def worker_env() -> dict:
    """Environment every Ray worker needs (set before torch loads in the worker).

    Two settings keep a healthy sweep's console free of error lines and bar spam: Ray Train's
    preemption watcher (an actor created with max_restarts=-1 and the workers' handles as
    constructor arguments, so Ray logs an ERROR per trial, ray-project/ray#53727) only reports
    node drains, which a trial does not use; and progress bars of Hugging Face loads (transformers'
    "Loading weights", hub downloads) reach the driver through Ray's log forwarding line by line.
    """
    env = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",  # below: a user's own setting wins
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
           "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")}
    for k in ("LMM_RAY_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def address_of(address: str | None) -> str | None:
    """The cluster a sweep connects to (--address, else RAY_ADDRESS), or None for a local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(cfg: SweepConfig, address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address_of(address)
    if address:  # an existing cluster (or inside `ray job submit`): connect, never size it
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": worker_env()})
        return
    # Train V2 frees a stopped trial's workers through the State API (the dashboard), from inside a
    # worker that finds "its" cluster by scanning the machine: with a second local Ray on the same
    # host (another user, a parallel test run) that fails with "Found multiple active Ray instances"
    # and a stopped trial's CPUs are never given back. Pinning the dashboard port and pointing the
    # workers' State API at it (RAY_API_SERVER_ADDRESS) keeps each sweep on its own cluster.
    port = _free_port()
    env = {**worker_env(), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    # A local cluster we start turns on token authentication and says so with a WARNING every time;
    # that line is expected here (RAY_AUTH_MODE set by the user is respected silently by Ray).
    import logging

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray gives its dashboard 60 s to load its 9 modules; on a busy 2-core machine that took longer
    # (measured: a CI run whose other tests were starting Ray too), and ray.init failed. Ray reads the
    # constant when it waits, so a user's RAY_DASHBOARD_STARTUP_TIMEOUT_S still wins.
    from ray._private import ray_constants

    if "RAY_DASHBOARD_STARTUP_TIMEOUT_S" not in os.environ and hasattr(ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S"):
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S, 240)
    # Ray's start-up waits are fixed (a node gets 30 s to register): a machine busy enough to miss
    # them gets one more try, then a message that says what to do instead of Ray's traceback.
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=os.cpu_count(),
                runtime_env={"env_vars": env},
                object_store_memory=cluster.LOCAL_OBJECT_STORE_BYTES,  # not the default 30% of RAM (cluster.py)
                include_dashboard=True,  # Train V2 cleans up stopped trials' workers through the State API
                dashboard_host="127.0.0.1",
                dashboard_port=port,
                log_to_driver=True,
                configure_logging=True,
                logging_level="WARNING",
            )
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception when its processes start too slowly
            ray.shutdown()
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            if attempt == 2:
                raise ClusterError("resources", f"a local Ray could not start on this machine ({first[:200]}); it is "
                                   "probably too busy", "run again when it is quieter, or start Ray yourself "
                                   "(`ray start --head`) and pass --address") from None
            print(f"[lmm_ray] Ray did not start ({first[:200]}); trying once more", file=sys.stderr, flush=True)
            port = _free_port()
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"


def _scaling(cfg: SweepConfig):
    import ray.train

    r = cfg.resources
    return ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0,
                                   resources_per_worker=cluster.worker_bundle(r))


def _quiet_reports() -> None:
    """No Ray Train INFO line per report, which repeats every metric of the stage (~60) on the
    driver's console. That logger is named after its file (`logging.getLogger(__file__)` in Ray
    2.60), so RunConfig's LoggingConfig does not reach it."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001 - private module; only the console noise depends on it
        pass


def quiet_train_loop(config: dict) -> None:
    """train.train_loop_per_worker, quietly (_quiet_reports)."""
    from lmm_ray.resume import quiet_teardown
    from lmm_ray.train import train_loop_per_worker

    _quiet_reports()
    quiet_teardown()
    train_loop_per_worker(config)


def quiet_base_loop(config: dict) -> None:
    """train.base_loop_per_worker, quietly (_quiet_reports)."""
    from lmm_ray.resume import quiet_teardown
    from lmm_ray.train import base_loop_per_worker

    _quiet_reports()
    quiet_teardown()
    base_loop_per_worker(config)


def make_trial_fn(cfg: SweepConfig, base_packed: dict, trial_data: str | None = None):
    """The Tune trial: builds the trial's TorchTrainer and runs it to the end."""
    import ray.train
    import ray.train.torch
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lmm_ray.resume import quiet_teardown

    storage = _train_storage(cfg)

    def trial(sampled: dict) -> None:
        quiet_teardown()  # (in the trial's actor: Tune's trial function runs there)
        tid = ray.tune.get_context().get_trial_id()
        spec = trial_spec(cfg, sampled, tid)
        ray.train.torch.TorchTrainer(
            quiet_train_loop,
            train_loop_config={"trial": spec.to_dict(), "base_eval": base_packed, "trial_data": trial_data,
                               "threads": max(1, int(cfg.resources.cpus_per_worker))},
            scaling_config=_scaling(cfg),
            run_config=ray.train.RunConfig(
                name=tid,  # deterministic per trial: a restarted trial re-attaches to its checkpoints
                storage_path=storage,
                callbacks=[TuneReportCallback()],
                failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                # Ray Train's INFO lines (resource requests, "Checkpoint successfully created" per
                # stage) are noise next to the progress table; warnings and errors still show.
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        ).fit()

    return trial


def evaluate_base(cfg: SweepConfig, trial_data: str | None = None) -> str:
    """The base model evaluated once per sweep, on Ray Train with a trial's resources (GPUs, and
    sharded over the workers like a trial); returns the text of base_eval.json."""
    import ray.train
    import ray.train.torch

    spec = trial_spec(cfg, cfg.search_space.example(), trial_id="base")
    result = ray.train.torch.TorchTrainer(
        quiet_base_loop,
        train_loop_config={"trial": spec.to_dict(), "trial_data": trial_data,
                           "threads": max(1, int(cfg.resources.cpus_per_worker))},
        scaling_config=_scaling(cfg),
        run_config=ray.train.RunConfig(name="base_eval", storage_path=cfg.sweep_dir,
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    ).fit()
    with result.checkpoint.as_directory() as d:
        return (Path(d) / BASE_FILE).read_text()


def _train_storage(cfg: SweepConfig) -> str:
    """Where Ray Train keeps the trials' checkpoints: <sweep>/train."""
    return cfg.sweep_dir.rstrip("/") + "/train" if is_uri(cfg.sweep_dir) else str(Path(cfg.sweep_dir) / "train")


class StageAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials that did not finish every stage.

    The stock class tells a trial stopped by ASHA as COMPLETE with the objective of its last (early)
    stage. Objectives fall as stages add forgetting, so a trial stopped after stage 1 usually looks
    better than every finished one, and the sampler chases it. Here a stopped trial is PRUNED
    (Optuna ranks pruned trials below complete ones, by their last reported value) and a trial that
    reported a failure (non-finite loss) is FAIL.
    """

    def __init__(self, *args, stages_total: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._stages_total = stages_total

    # One trial, one set of names: the Optuna trial carries the Tune id, the MLflow run id and the
    # three objectives as user attributes, and the study names its objectives (optuna-dashboard's
    # axes); tracking.LINKS gives the MLflow run its Optuna number.

    def _setup_study(self, mode):
        import warnings

        import optuna

        super()._setup_study(mode)
        names = self._metric if isinstance(self._metric, list) else [self._metric]
        if not all(isinstance(n, str) for n in names):
            return
        with warnings.catch_warnings():  # set_metric_names is marked experimental (since Optuna 3.2)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(names))

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        ot = self._ot_trials.get(trial_id)
        if ot is not None and trial_id not in tracking.LINKS.optuna:
            tracking.LINKS.optuna[trial_id] = ot.number
            ot.set_user_attr("tune_trial_id", trial_id)
        return config

    def restore(self, checkpoint_path: str):
        from lmm_ray import resume

        super().restore(checkpoint_path)
        tracking.LINKS.optuna.update({tid: t.number for tid, t in self._ot_trials.items()})
        # Trials Optuna has finished, some perhaps after Tune's last save: Tune may run those again,
        # Optuna hears nothing more of any of them (and no warning repeats their whole result).
        self._settled = resume.settled_in_optuna(self._ot_study, self._ot_trials)
        self._completed_trials |= self._settled

    def on_trial_result(self, trial_id: str, result: dict):
        if trial_id in getattr(self, "_settled", ()):
            return  # (the stock class would log a warning with the whole result)
        super().on_trial_result(trial_id, result)

    def _link(self, trial_id: str, result: dict | None) -> None:
        """The trial's MLflow run id and objectives as user attributes, while it can still take them."""
        ot = self._ot_trials.get(trial_id)
        if ot is None or trial_id in self._completed_trials:
            return
        try:
            if trial_id in tracking.LINKS.runs:
                ot.set_user_attr("mlflow_run_id", tracking.LINKS.runs[trial_id])
            for name, _ in objective.VECTOR:
                v = (result or {}).get(name)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    ot.set_user_attr(name, float(v))
        except Exception as exc:  # noqa: BLE001 - names are a convenience: never break the sweep
            print(f"[lmm_ray] could not label Optuna trial {ot.number}: {exc}", file=sys.stderr)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        from optuna.trial import TrialState

        if trial_id in getattr(self, "_settled", ()):
            return
        self._link(trial_id, result)
        if result and not error and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            failed = bool(result.get("failed"))
            if failed or int(result.get("stage", 0)) < self._stages_total:
                try:
                    self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.FAIL if failed else TrialState.PRUNED)
                except Exception as exc:  # noqa: BLE001 - like the stock class: never break the sweep
                    print(f"[lmm_ray] could not tell Optuna about trial {trial_id}: {exc}", file=sys.stderr)
                self._completed_trials.add(trial_id)
                return
        super().on_trial_complete(trial_id, result, error)


def make_searcher(cfg: SweepConfig):
    import optuna

    if not cfg.search_space.searched:
        return None  # fixed values only: one configuration, Tune's default search (Optuna refuses an empty space)
    s = cfg.search
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=s.seed, population_size=s.population_size),
        "random": lambda: optuna.samplers.RandomSampler(seed=s.seed),
        "grid": lambda: optuna.samplers.GridSampler(cfg.search_space.grid(), seed=s.seed),
    }
    sampler = samplers[s.algorithm]()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not an INFO line per study and trial
    storage = None
    if not is_uri(cfg.sweep_dir):  # the Optuna study lives beside the sweep, so it can be reopened
        storage = optuna.storages.RDBStorage(f"sqlite:///{Path(cfg.sweep_dir).resolve() / 'optuna.db'}")
    if cfg.objective.mode == "multi":
        names = [n for n, _ in objective.VECTOR]
        modes = [m for _, m in objective.VECTOR]
        # Metric and mode go on the searcher only: set on TuneConfig they would silently turn
        # the search single-objective (docs/architecture.md).
        return StageAwareOptunaSearch(metric=names, mode=modes, sampler=sampler, study_name=cfg.name, storage=storage,
                                      stages_total=len(cfg.stages))
    return StageAwareOptunaSearch(sampler=sampler, study_name=cfg.name, storage=storage, stages_total=len(cfg.stages))


def make_scheduler(cfg: SweepConfig):
    if cfg.scheduler.type != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # time_attr is our own stage counter: training_iteration restarts at 1 after a restore.
    return ASHAScheduler(time_attr="stage", max_t=len(cfg.stages), grace_period=cfg.scheduler.grace_period,
                         reduction_factor=cfg.scheduler.reduction_factor)


# ---------------------------------------------------------------------------------------------


def run(cfg: SweepConfig, *, resume: bool = False, address: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate (once), start or connect to Ray, run or resume the sweep, print and log its results."""
    import ray
    import ray.tune

    from lmm_ray import private, validate
    from lmm_ray import resume as resuming
    from lmm_ray.train import unpack_base

    print(validate.check(cfg, address=address), flush=True)  # everything that can fail before Ray starts
    private.check_resume_trust(cfg.sweep_dir, resume)  # --resume unpickles Tune's state: only from a folder only you can write
    store = Store(cfg.sweep_dir)
    started = store.exists(TUNE_DIR)
    if resume and not store.exists(f"{TUNE_DIR}/tuner.pkl"):
        raise SweepError(f"--resume: no sweep to resume at {cfg.sweep_dir} (no Tune state there; run it without --resume)")
    if started and not resume:
        raise SweepError(f"sweep {cfg.name!r} already exists at {cfg.sweep_dir}: continue it with --resume, "
                         f"or give a new name (name=... on the command line) — a fresh sweep never reuses a name")
    lock = _lock(cfg)  # held until this process ends (a killed driver releases it)
    t0 = time.time()
    parent = None
    try:
        init_ray(cfg, address)
        # On a cluster: refuse, before anything is written or booked, a trial that cannot fit or a
        # storage path that some node cannot see.
        cluster.check_cluster_resources(cfg)
        if cfg.resources.gpus_per_worker and cfg.resources.gpu_memory_gb is None and address_of(address):
            budget = cluster.gpu_memory_gib()  # the cluster's own GPUs, when the sweep file does not say
            if budget is not None:
                print(validate.check_memory(cfg, budget), flush=True)
        cluster.check_storage(cfg.sweep_dir)
        store.write_text("sweep.json", json.dumps(cfg.public_dict(), indent=1, default=str))
        parent = tracking.parent_run(cfg.mlflow_uri, cfg.experiment, cfg.name, cfg.public_dict(),
                                     None if store.is_uri else str(store.local / "mlartifacts"))
        # The trials' evaluation sets and stage pools, built once by the base evaluation (train.TRIAL_DATA).
        trial_data = None if store.is_uri else str(store.local / TRIAL_DATA)
        if not store.exists(BASE_FILE):
            print(f"[lmm_ray] evaluating the base model {cfg.model} once for the whole sweep ...", file=sys.stderr, flush=True)
            store.write_text(BASE_FILE, evaluate_base(cfg, trial_data))
        packed = json.loads(store.read_text(BASE_FILE))
        packed["probe"] = bytes.fromhex(packed["probe"])
        base_metrics = unpack_base(packed)[0]
        trainable = ray.tune.with_resources(make_trial_fn(cfg, packed, trial_data), cluster.TRIAL_DRIVER_RESOURCES)
        logger = tracking.TrialLogger(cfg.mlflow_uri, cfg.experiment, cfg.name, parent, len(cfg.stages), base_metrics,
                                      cfg.stage_names, predictions_root=None if store.is_uri else str(store.local / PREDICTIONS))
        if resume:
            tuner = ray.tune.Tuner.restore(f"{cfg.sweep_dir.rstrip('/')}/{TUNE_DIR}", trainable=trainable,
                                           resume_unfinished=True, resume_errored=True)
        else:
            # Not reuse_actors=True: a trial ASHA stops is still inside TorchTrainer.fit() when Tune
            # resets its actor for the next trial, the reset fails and that trial errors and hangs
            # the sweep (measured; docs/benchmarks.md, "Sweep vs plain loop").
            tc = dict(search_alg=make_searcher(cfg), scheduler=make_scheduler(cfg), num_samples=cfg.search.num_trials,
                      max_concurrent_trials=cfg.search.max_concurrent)
            if cfg.objective.mode == "scalar":
                tc.update(metric="objective", mode="max")
            tuner = ray.tune.Tuner(
                trainable,
                param_space=cfg.search_space.to_tune(),
                tune_config=ray.tune.TuneConfig(**tc),
                run_config=ray.tune.RunConfig(name=TUNE_DIR, storage_path=cfg.sweep_dir,
                                              callbacks=[logger, resuming.StorageWatch(cfg.sweep_dir),
                                                         resuming.QuietAfterCtrlC()],
                                              failure_config=ray.tune.FailureConfig(max_failures=cfg.resources.max_failures),
                                              progress_reporter=console.make_reporter(cfg), verbose=1),
            )
        # The legacy output engine honours progress_reporter (the new one ignores it); verbose=1
        # there means "status tables only", no per-result dumps. Read when fit() starts.
        prev_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        try:
            with resuming.SigintWatch() as watch, console.tune_lines_filtered(), cluster.own_staging_folder(cfg.name):
                results_grid = tuner.fit()
        finally:
            if prev_output is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = prev_output
        if trial_data:  # ~370 MB for the quickstart; a trial resumed later builds its own data
            Path(trial_data).unlink(missing_ok=True)
        if watch.interrupted:
            raise KeyboardInterrupt
        res, st = results.collect(results_grid, cfg, base_metrics, tracking.LINKS.optuna)
        # What a killed driver left out of step with Tune's state (resume.py): closed, not left RUNNING.
        try:
            tracking.settle_runs(cfg.mlflow_uri, cfg.experiment, cfg.name, res)
            resuming.settle_optuna(cfg, res["trial_id"].astype(str))
        except Exception as e:  # noqa: BLE001 - bookkeeping: the results below matter more
            if resuming.storage_problem(cfg.sweep_dir):
                raise
            print(f"[lmm_ray] could not reconcile MLflow/Optuna with Tune's state: {e}", file=sys.stderr)
        text, files, front = results.write_tables(cfg, res, st, store)
        tracking.log_result(cfg, parent, res, front, files)
        print(text)
        exp_id, _ = ui.sweep_ids(cfg.mlflow_uri, cfg.experiment, cfg.name)
        print(ui.where_to_look(cfg, exp_id, parent))
        print(f"\nwall time {time.time() - t0:.0f} s", file=sys.stderr)
        tracking.finish_parent(cfg.mlflow_uri, parent)
        return res, st
    except KeyboardInterrupt:  # Ctrl-C (caught by Tune during fit, raised again above), or before fit
        raise resuming.interrupted(cfg, parent, store.exists(f"{TUNE_DIR}/tuner.pkl")) from None
    except Exception:
        why = resuming.storage_problem(cfg.sweep_dir)
        if why:  # the storage turned read-only (or full) mid-sweep: Optuna's or MLflow's write failed first
            raise resuming.storage_lost(cfg.sweep_dir, why) from None
        raise
    finally:
        ray.shutdown()
        if lock is not None:
            lock.close()  # releases the lock


def _lock(cfg: SweepConfig):
    """Take the sweep's lock file (local storage): a second `lmm-ray sweep` of the same name is
    refused while this one runs, instead of both writing one folder, one Optuna study and one
    MLflow parent. The lock is an flock: the kernel releases it when the process dies."""
    if is_uri(cfg.sweep_dir):
        return None
    import fcntl

    Path(cfg.sweep_dir).mkdir(parents=True, exist_ok=True)
    f = open(Path(cfg.sweep_dir) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise SweepError(f"sweep {cfg.name!r} is running now ({owner}) in {cfg.sweep_dir}: wait for it to end "
                         "(then --resume continues it), or start another sweep with name=...") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}")
    f.flush()
    return f
