"""What a sweep prints while Tune runs: a progress table with one row per trial (a row when a
trial starts, ends or reports a stage; a heartbeat otherwise), and Tune's and Optuna's lines that do
not fit a CLI dropped or shortened while `tuner.fit()` runs. sweep.run uses both."""

from __future__ import annotations

import contextlib
import os
import time

from ray.tune import CLIReporter

from lmm_ray import results, tracking
from lmm_ray.config import SweepConfig

# The live progress table: one row per trial with only these columns (every reported metric,
# ~60 per stage, would otherwise scroll by). Ray 2.60's default "new output engine" ignores
# RunConfig(progress_reporter=...) and prints the whole result dict of every finished trial, so
# run() switches to the documented legacy engine (RAY_AIR_NEW_OUTPUT=0) for its CLIReporter.
PROGRESS_PARAMS = ("recipe", "lr")
PROGRESS_METRICS = ("stage", "learning", "heldout_change", "counting_bias", "objective")


class StageReporter(CLIReporter):
    """A CLIReporter that prints its table whenever a trial starts, ends or reports a stage, and
    otherwise every `max_report_frequency` seconds (a heartbeat), instead of every 5 s."""

    def __init__(self, stages_total: int = 0, **kw):
        super().__init__(**kw)
        self._seen = None
        self._stages_total = stages_total

    def _current_best_trial(self, trials):
        # "Current best trial" among trials that finished every stage: an objective after stage 1
        # is not comparable with a final one (later stages add forgetting).
        return super()._current_best_trial(
            [t for t in trials if int((t.last_result or {}).get("stage", 0)) >= self._stages_total])

    def _progress_str(self, trials, done, *sys_info, **kw):
        # Tune's status block names a driver-artifacts folder under /tmp/ray (not the sweep's) and
        # prints the best trial with every digit; say where the sweep is and what the best one is.
        lines = []
        for line in super()._progress_str(trials, done, *sys_info, **kw).split("\n"):
            if line.startswith("Result logdir:"):
                continue
            if line.startswith("Current best trial:"):
                best, metric = self._current_best_trial(trials)
                line = _best_line(best, metric) if best is not None else line
            lines.append(line)
        return "\n".join(lines)

    def should_report(self, trials, done: bool = False) -> bool:
        seen = sorted((t.trial_id, t.status, (t.last_result or {}).get("stage")) for t in trials)
        if done and seen == self._seen and len(trials) <= self._max_progress_rows:
            return False  # the final table would repeat the last one row for row
        if done or seen != self._seen:
            self._seen = seen
            self._last_report_time = time.time()
            return True
        return super().should_report(trials, done)


def _best_line(trial, metric: str) -> str:
    from lmm_ray.pareto import fmt_lr

    cfg, last = trial.config or {}, trial.last_result or {}
    lr = f", lr {fmt_lr(float(cfg['lr']))}" if "lr" in cfg else ""
    n = tracking.LINKS.optuna.get(trial.trial_id)
    return (f"Best finished trial so far: {trial} ({cfg.get('recipe', '?')}{lr}"
            + (f", Optuna #{n}" if n is not None else "") + f"): {metric} {float(last.get(metric, float('nan'))):+.2f}")


def make_reporter(cfg: SweepConfig) -> StageReporter:
    # No metric/mode here: Tune hands the reporter TuneConfig's (scalar mode: the objective, so the
    # status shows the best trial so far) and refuses a reporter that has its own.
    return StageReporter(
        stages_total=len(cfg.stages), parameter_columns=list(PROGRESS_PARAMS), metric_columns=list(PROGRESS_METRICS),
        total_samples=cfg.search.num_trials, max_report_frequency=120, print_intermediate_tables=True,
        max_column_length=24,
    )


class _DropLines:
    """A logging filter that drops records starting with any of `prefixes`."""

    def __init__(self, *prefixes: str):
        self.prefixes = prefixes

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefixes)


class _TrialFailedLine:
    """Tune's "Trial task failed for trial X" with the whole traceback (~40 lines of Ray's wrappers)
    becomes one line with the reason (results.failure_reason); the whole error stays in the trial's
    MLflow run (error.txt) and its Tune folder."""

    def filter(self, record) -> bool:
        if str(record.msg).startswith("Trial task failed for trial") and record.exc_info:
            error = record.exc_info if isinstance(record.exc_info, BaseException) else record.exc_info[1]
            record.msg = f"{record.getMessage()}: {results.failure_reason(error)}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextlib.contextmanager
def tune_lines_filtered():
    """Some of Tune's lines do not fit a CLI: after Ctrl-C, "Resume experiment with:
    Tuner.restore(...)" (Python, where `lmm-ray sweep --resume` is the way: the CLI prints it),
    "Trials did not complete: [...]" at ERROR level for failed trials (the summary says which and
    why), a failed trial's traceback (_TrialFailedLine), and Optuna's "`Study.stop` is supposed to
    be invoked inside an objective function" when a grid ends (GridSampler calls it from `tell`;
    the trial's result is stored before, measured). Tune's "may be a performance bottleneck"
    warnings start at 5 s instead of 0.5 s (TUNE_WARN_THRESHOLD_S still wins): a trial reports once
    per stage, and the first report's MLflow run set-up took 0.6 s on a busy 2-core machine."""
    import logging

    from ray.tune.utils.util import warn_if_slow

    log, controller = logging.getLogger("ray.tune.tune"), logging.getLogger("ray.tune.execution.tune_controller")
    optuna_search = logging.getLogger("ray.tune.search.optuna.optuna_search")
    f, one_line = _DropLines("Experiment has been interrupted", "Trials did not complete"), _TrialFailedLine()
    grid_end = _DropLines("`Study.stop` is supposed to be invoked")
    log.addFilter(f)
    controller.addFilter(one_line)
    optuna_search.addFilter(grid_end)
    threshold = warn_if_slow.DEFAULT_THRESHOLD
    if "TUNE_WARN_THRESHOLD_S" not in os.environ:
        warn_if_slow.DEFAULT_THRESHOLD = max(threshold, 5.0)
    try:
        yield
    finally:
        log.removeFilter(f)
        controller.removeFilter(one_line)
        optuna_search.removeFilter(grid_end)
        warn_if_slow.DEFAULT_THRESHOLD = threshold
