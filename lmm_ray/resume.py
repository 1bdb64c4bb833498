"""A sweep that stops before its end, and its resume: Ctrl-C, a killed driver, storage that can
no longer be written. sweep.run calls these; the MLflow side of each is tracking.py's.

Three stores keep a sweep's state and a killed driver leaves them out of step: Tune's
experiment state (saved every few seconds), Optuna's study (written when a trial is told) and
MLflow's runs (written by the TrialLogger callback). `--resume` starts from Tune's state, so what
the other two recorded after Tune's last save is reconciled here and in tracking.settle_runs:
- a trial Optuna has already finished is never reported to Optuna again (`settled_in_optuna`);
- Optuna trials and MLflow runs of trials that Tune never saved end FAIL / KILLED, not RUNNING
  forever (`settle_optuna`, tracking.settle_runs).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ray.tune import Callback

from lmm_ray.errors import Interrupted, SweepError
from lmm_ray.schema import is_uri


class SigintWatch:
    """Whether Ctrl-C stopped `tuner.fit()`.

    Tune catches the first SIGINT itself: its handler sets a flag, puts back the handler it found
    and lets fit() return normally with unfinished trials, which looks like a finished sweep. So the
    handler Tune finds is ours: after fit(), ours being back in place means Tune's handler ran
    (after a normal end Tune's own is still installed). A second SIGINT reaches ours directly and
    raises KeyboardInterrupt, as Python's default does.
    """

    def __enter__(self):
        self.interrupted = False
        self._main = threading.current_thread() is threading.main_thread()
        if self._main:
            self._before = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.interrupted = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if not self._main:
            return False
        tune_catches = not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        if tune_catches and signal.getsignal(signal.SIGINT) == self._handler:  # (a bound method: ==, not is)
            self.interrupted = True
        signal.signal(signal.SIGINT, self._before)
        return False


def interrupted(cfg, parent_id: str | None, tune_state: bool) -> Interrupted:
    """Close what a Ctrl-C leaves open (MLflow: the sweep's run and its running trials KILLED) and
    the exception the CLI turns into its one-line message and exit code 130."""
    if parent_id is not None:
        from lmm_ray import tracking

        try:
            tracking.close_interrupted(cfg.mlflow_uri, cfg.experiment, cfg.name, parent_id)
        except Exception as e:  # noqa: BLE001 - the message and exit code matter more than the marks
            print(f"[lmm_ray] could not mark the MLflow runs killed: {e}", flush=True)
    return Interrupted("interrupted", resumable=tune_state)


def settled_in_optuna(study, ot_trials: dict) -> set[str]:
    """Tune trial ids whose Optuna trial is already finished (COMPLETE, PRUNED, FAIL) in the study's
    storage. A driver killed right after Optuna recorded a trial's end, before Tune saved it, leaves
    the trial RUNNING in Tune's state: a resume runs it again and reporting it to Optuna a second
    time raises UpdateFinishedTrialError, on every resume."""
    from optuna.trial import TrialState

    done = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                       TrialState.FAIL))}
    return {tid for tid, t in ot_trials.items() if t.number in done}


def settle_optuna(cfg, tune_ids) -> list[int]:
    """Optuna trials still RUNNING whose Tune trial the sweep does not have (created after Tune's
    last save, then the driver was killed) are told FAIL: no sweep will finish them. Returns their
    numbers."""
    if is_uri(cfg.sweep_dir) or not (Path(cfg.sweep_dir) / "optuna.db").is_file():
        return []
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{Path(cfg.sweep_dir).resolve() / 'optuna.db'}")
    lost = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("tune_trial_id") not in set(tune_ids)]
    for n in lost:
        study.tell(n, state=TrialState.FAIL)
    return lost


def storage_problem(sweep_dir: str) -> str | None:
    """Why the sweep's (local) folder cannot be written now, or None. Tries a write, because
    permission bits say nothing to root (an immutable folder, a read-only mount, a full disk)."""
    if is_uri(sweep_dir):
        return None
    folder = Path(sweep_dir)
    try:
        probe = folder / f".write-check-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        for db in ("optuna.db", "mlflow.db"):  # the two stores written in place
            if (folder / db).exists():
                open(folder / db, "ab").close()
    except OSError as e:
        return e.strerror or str(e)
    return None


def storage_lost(sweep_dir: str, why: str) -> SweepError:
    return SweepError(
        f"the sweep's storage folder {sweep_dir} cannot be written any more ({why}), so the sweep stopped. "
        "Nothing it finished is lost: trials, checkpoints, Optuna's study and the MLflow runs are as they were last "
        "written there. Make the folder writable again (permissions, disk space, the mount), then run the same "
        "command with --resume")



class StorageWatch(Callback):
    """A Tune callback that stops the sweep, with storage_lost's message, within seconds of its
    folder turning read-only (or full). Without it, each trial that starts then fails creating its
    checkpoint folder, Tune logs each failure with a traceback, and the sweep ends minutes later
    with Optuna's or MLflow's sqlite error."""

    def __init__(self, sweep_dir: str, every_s: float = 5.0):
        self.sweep_dir, self.every_s, self._next = sweep_dir, every_s, 0.0

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every_s
        why = storage_problem(self.sweep_dir)
        if why:
            raise storage_lost(self.sweep_dir, why)


class QuietAfterCtrlC(Callback):
    """After a Ctrl-C the console says one thing: how to resume. Ray forwards every worker's output
    to the driver's console, and the trials Tune tears down then print their actors' deaths with
    tracebacks (a Train controller whose worker group was starting, a worker's C++ stack). So the
    first Ctrl-C stops that forwarding (the workers' own log files keep everything), then reaches
    Tune's handler as before. Installed in `setup`, when Tune's handler is in place."""

    def setup(self, **info):
        if threading.current_thread() is not threading.main_thread():
            return
        tunes = signal.getsignal(signal.SIGINT)
        if not callable(tunes):
            return

        def on_ctrl_c(signum, frame):
            mute_worker_output()
            tunes(signum, frame)  # (it puts back the handler it found: SigintWatch still sees the Ctrl-C)

        signal.signal(signal.SIGINT, on_ctrl_c)


def quiet_teardown() -> None:
    """Let this Ray worker process die without a traceback on the sweep's console.

    Ray stops a finished trial's processes with SIGTERM (the trial's placement group is removed
    while its actor is still exiting) and its SIGTERM handler raises SystemExit wherever Python is;
    inside a garbage-collection callback that prints "Exception ignored in ... SystemExit", which
    Ray forwards to the driver (seen after a healthy sweep's last trial). A SystemExit nobody can
    catch is the process ending as asked, so only it is dropped; any other unraisable exception
    goes to the hook that was there."""
    import sys

    if getattr(sys.unraisablehook, "lmm_ray_quiet_teardown", False):
        return  # once per process: a second call would wrap the hook again

    def hook(unraisable, _before=sys.unraisablehook):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, SystemExit):
            return
        _before(unraisable)

    hook.lmm_ray_quiet_teardown = True
    sys.unraisablehook = hook


def mute_worker_output() -> None:
    """Stop printing Ray workers' stdout/stderr on this driver's console (Ray's own handler name)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:  # a Ray that moved it: the console stays as noisy as Ray makes it
        return
    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
