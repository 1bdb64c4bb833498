"""Faults injected into small sweeps (issue 16): each ends with the results of an uninterrupted run
or a clear refusal, no duplicate or orphaned MLflow run, and nothing finished re-run or lost.

Two sweeps of one file (1 stage of 3 steps, 4 eval samples, a grid over three learning rates run
one at a time: 1e-4 and 3e-4 train, 1e+06 goes non-finite), faults from tests/fault_driver.py:
  - "drv": Ray Train worker killed mid-stage with resources.max_failures=1 (recovers); the driver
    SIGKILLed right after Optuna records a COMPLETE trial (Optuna COMPLETE, Tune's state RUNNING);
    --resume while the storage turns read-only (clear message, exit 2); --resume again (completes);
  - "int": a worker killed with resources.max_failures=0 (that trial fails with a readable reason, the
    sweep goes on); a second driver on the sweep refused; Ctrl-C (exit 130, the resume command, MLflow
    runs KILLED); --resume (which retries the trial that failed with an error).
The two run at once, each on a local Ray of its own (`scenarios`). The trial with lr 1e-4 is
compared, in both, with the same trial run plainly in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_sweep import _env, _kill_group, history, mlflow_client, sweep_runs, tune_states

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"
GOOD, OTHER, NONFINITE = 1e-4, 3e-4, 1e6
SWEEP = f"""\
model: base:qwen2_5_vl@ci
stages:
  - skill: count
    steps: 3
heldout: [color]
train: {{batch_size: 4, n_train: 16}}
eval: {{n_per_skill: 4, batch_size: 4, caption_probe_n: 0}}
search_space:
  recipe: {{choice: [sa_proj]}}
  lr: {{choice: [{GOOD}, {OTHER}, {NONFINITE}]}}
search: {{algorithm: grid, num_trials: 3, seed: 0, max_concurrent: 1}}
"""
AGGREGATES = ("learning", "heldout_change", "counting_bias", "objective")
NONFINITE_REASON = r"^loss became (nan|inf|-inf) at stage 1, step \d+ \(lr=1e\+06\)$"  # the trainer's own words


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ci_base):
    root = tmp_path_factory.mktemp("faults")
    (root / "f.yaml").write_text(SWEEP)
    return root


def start(root: Path, name: str, *extra: str, marks: Path | None = None, env: dict | None = None,
          log: str = "run") -> subprocess.Popen:
    argv = [sys.executable, str(DRIVER) if marks else "-m", *([] if marks else ["lmm_ray.cli"]), "sweep",
            str(root / "f.yaml"), f"storage={root}", f"name={name}", *extra]
    e = {**_env(), **(env or {}), **({"FAULT_MARKS": str(marks)} if marks else {})}
    out = open(root / f"{name}.{log}.log", "w")
    return subprocess.Popen(argv, cwd=ROOT, env=e, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(p: subprocess.Popen, root: Path, name: str, log: str, timeout: float = 600) -> tuple[int, str]:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        raise AssertionError(f"{name} {log} ran over {timeout} s:\n{text(root, name, log)[-5000:]}") from None
    _kill_group(p)  # what a killed driver left behind (raylet, workers)
    return rc, text(root, name, log)


def text(root: Path, name: str, log: str) -> str:
    return (root / f"{name}.{log}.log").read_text(errors="replace")


def optuna_trials(d: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{d / 'optuna.db'}").trials


def by_lr(res: pd.DataFrame) -> dict[float, pd.Series]:
    return {float(r["lr"]): r for _, r in res.iterrows()}


def uninterrupted(root: Path, name: str, lr: float) -> dict:
    """The trial's aggregates run plainly in this process (1 thread, as its Ray worker), with the
    sweep's own base evaluation."""
    import torch

    from lmm_ray import config, train, trial

    cfg = config.load_sweep(root / "f.yaml", [f"storage={root}", f"name={name}"])
    packed = json.loads((root / name / "base_eval.json").read_text())
    packed["probe"] = bytes.fromhex(packed["probe"])
    out: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.run_trial(trial.trial_spec(cfg, {"recipe": "sa_proj", "lr": lr}, "ref"), lambda m, d: out.append(dict(m)),
                        base=train.unpack_base(packed))
    finally:
        torch.set_num_threads(threads)
    return {k: out[-1][k] for k in AGGREGATES}


def check_ended_cleanly(d: Path, name: str, res: pd.DataFrame, log: str, retried=()):
    """Every store agrees with results.csv: one MLflow run per trial, none left RUNNING, the
    parent FINISHED; Optuna has no RUNNING trial and COMPLETE exactly the finished ones, except
    `retried` trials (failed with an error, told FAIL, then finished when --resume retried them:
    Optuna cannot reopen a finished trial)."""
    parents, children = sweep_runs(d, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = [r.data.tags["lmm_ray.trial_id"] for r in children if r.data.tags.get("lmm_ray.status") != "lost"]
    assert sorted(ids) == sorted(res["trial_id"]), (ids, res["trial_id"].tolist())  # no duplicate, none missing
    assert not [r for r in children if r.info.status == "RUNNING"], [r.data.tags for r in children]
    run = {r.data.tags["lmm_ray.trial_id"]: r for r in children}
    for row in res.itertuples():
        r = run[row.trial_id]
        assert r.info.status == ("FAILED" if row.status == "failed" else "FINISHED"), (row, r.info.status)
        assert r.data.tags["lmm_ray.status"] == row.status
        if row.status == "failed":  # one readable line, the same everywhere
            assert r.data.tags["lmm_ray.reason"] == row.reason
            assert "\x1b" not in row.reason and "RayTaskError" not in row.reason and "\n" not in row.reason
            assert f"): {row.reason}" in log  # the console's summary says why
    trials = optuna_trials(d, name)
    assert not [t for t in trials if t.state.name == "RUNNING"]
    done = sorted(t.user_attrs["tune_trial_id"] for t in trials if t.state.name == "COMPLETE")
    assert done == sorted(set(res.loc[res["status"] == "finished", "trial_id"]) - set(retried))
    for tid in [*res.loc[res["status"] == "failed", "trial_id"], *retried]:
        assert [t.state.name for t in trials if t.user_attrs.get("tune_trial_id") == tid] == ["FAIL"]
    c = mlflow_client(d)
    for row in res[res["status"] == "finished"].itertuples():  # one point per step, also for retried trials
        assert [s for s, _ in history(c, run[row.trial_id].info.run_id, "objective")] == [0, 1]


class Immutable:
    """The sweep folder made unwritable for this process: chmod for a normal user; as root (which
    chmod does not stop) the immutable attribute (chattr +i), which stops root too."""

    def __init__(self, folder: Path):
        self.folder, self.root = folder, os.geteuid() == 0

    def on(self):
        # (not check=True: a file Ray removes while -R walks the folder makes it exit 1; the probe decides)
        subprocess.run(["chattr", "-R", "+i", str(self.folder)] if self.root else ["chmod", "-R", "a-w", str(self.folder)],
                       capture_output=True)
        try:
            (self.folder / ".probe").write_text("")
        except OSError:
            return
        self.off()
        pytest.fail(f"could not make {self.folder} read-only here (root without chattr support?)")

    def off(self):
        subprocess.run(["chattr", "-R", "-i", str(self.folder)] if self.root else ["chmod", "-R", "u+w", str(self.folder)],
                       check=True)


# ---------------------------------------------------------------------------------------------


def test_failure_reason_is_the_innermost_message_on_one_line():
    """What Ray hands the driver for a failed trial, unwrapped: RayTaskError -> WorkerGroupError ->
    the worker's exception; its text form (error.txt, colour codes and all); a worker that died."""
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from lmm_ray.results import failure_reason

    inner = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    text = ("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.1)\nTraceback (most recent call last):\n"
            '  File "/x/trainer.py", line 9, in fit\n    raise e\nray.train.WorkerGroupError: Training failed due to '
            'worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n  File "/x/optim.py", line 3\n'
            "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    wrapped = RayTaskError("ImplicitFunc.train", text, WorkerGroupError("[Rank 0 Error Snippet]:\n...", {0: inner}))
    want = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert failure_reason(wrapped) == failure_reason(wrapped.as_instanceof_cause()) == failure_reason(text) == want
    died = WorkerGroupError("x", {0: WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())})
    assert failure_reason(died) == ("a training worker died (killed, out of memory or crashed): "
                                    "The actor died unexpectedly before finishing this task.")
    assert failure_reason("non-finite loss (nan) at stage 1, step 2 (lr=1e+06)\n") == "non-finite loss (nan) at stage 1, step 2 (lr=1e+06)"
    assert len(failure_reason(ValueError("x" * 1000))) == 300


def test_sigint_watch_sees_the_ctrl_c_that_tune_caught():
    """Tune's own SIGINT handler (the real one, installed as tune.run installs it) swallows the first
    Ctrl-C; SigintWatch still knows; without a Ctrl-C it says nothing; the handler before is back."""
    import signal as sig

    from ray.tune.tune import _setup_signal_catching

    from lmm_ray.resume import SigintWatch

    before = sig.getsignal(sig.SIGINT)
    with SigintWatch() as quiet:
        _setup_signal_catching()  # what Tuner.fit() does first
    assert not quiet.interrupted and sig.getsignal(sig.SIGINT) is before
    with SigintWatch() as hit:
        caught = _setup_signal_catching()
        os.kill(os.getpid(), sig.SIGINT)
        time.sleep(0.1)  # (the handler runs in the main thread between bytecodes)
        assert caught.is_set()  # Tune stopped "gracefully": fit() would return normally
    assert hit.interrupted and sig.getsignal(sig.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), SigintWatch() as twice:  # a second Ctrl-C is not swallowed
        _setup_signal_catching()
        os.kill(os.getpid(), sig.SIGINT)
        time.sleep(0.1)
        os.kill(os.getpid(), sig.SIGINT)
        time.sleep(0.1)
    assert twice.interrupted and sig.getsignal(sig.SIGINT) is before


def test_ctrl_c_stops_forwarding_worker_output_and_still_stops_tune():
    """QuietAfterCtrlC wraps Tune's handler: the first Ctrl-C removes Ray's handler that prints
    workers' output on the driver console, Tune still stops, SigintWatch still sees it; a run
    without a Ctrl-C keeps the workers' output."""
    import signal as sig

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from ray.tune.tune import _setup_signal_catching

    from lmm_ray.resume import QuietAfterCtrlC, SigintWatch

    def printed():
        return [name for name, _ in dispatcher.handlers if name == "ray_print_logs"]

    had = printed()
    dispatcher.add_handler("ray_print_logs", lambda data: None)
    try:
        with SigintWatch() as quiet:
            _setup_signal_catching()
            QuietAfterCtrlC().setup()
        assert not quiet.interrupted and printed()
        with SigintWatch() as hit:
            caught = _setup_signal_catching()
            QuietAfterCtrlC().setup()
            os.kill(os.getpid(), sig.SIGINT)
            time.sleep(0.1)
            assert caught.is_set() and not printed()
        assert hit.interrupted
    finally:
        dispatcher.remove_handler("ray_print_logs")
        for _ in had:  # (this process's own Ray, if a test started one, prints again)
            from functools import partial

            from ray._private.worker import print_to_stdstream

            dispatcher.add_handler("ray_print_logs", partial(print_to_stdstream, ignore_prefix=False))


@pytest.fixture(scope="module")
def scenarios(setup):
    """Both fault scenarios, started together at the module's first slow test: each mostly waits on
    its sweep (process and Ray start-ups, Ray Train's worker start per trial), so two at once fill
    the 2 cores better than one after the other. Each runs its sweeps on a local Ray of its own,
    as `make sweep` does. A scenario's assertions fail in its thread and surface in its test
    (Future.result); the reference trial (`uninterrupted`) runs in the test, in the main thread
    (torch's thread count is per process)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)
    try:
        yield {"drv": pool.submit(driver_killed_then_read_only_then_resume, setup),
               "int": pool.submit(ctrl_c_then_resume, setup)}
    finally:
        pool.shutdown(wait=True)  # each ends: its sweeps finish, fail or hit their time-outs


def driver_killed_then_read_only_then_resume(root: Path) -> dict:
    name = "drv"
    d, marks = root / name, root / "drv_marks"
    marks.mkdir()
    worker = {"FAULT_KILL_WORKER_LR": str(GOOD)}  # once, whichever run reaches that trial
    fault = {"FAULT_KILL_DRIVER_AFTER_TELL": "1", **worker}
    rc, log = finish(start(root, name, "resources.max_failures=1", marks=marks, env=fault, log="1"), root, name, "1")
    assert rc == -signal.SIGKILL and (marks / "driver_killed").exists(), log[-5000:]
    told = (marks / "driver_killed").read_text()
    # the state issue 16 saw: Optuna has the trial COMPLETE, Tune's saved state has it unfinished
    assert [t.state.name for t in optuna_trials(d, name) if t.user_attrs.get("tune_trial_id") == told] == ["COMPLETE"]
    assert tune_states(d)[told] in ("RUNNING", "PENDING"), tune_states(d)
    started_once = {p.name for p in marks.glob(f"start.{OTHER:g}.*")}
    assert len(started_once) == 1, started_once

    # --resume while the storage turns read-only: one clear message, exit 2, nothing lost
    p = start(root, name, "resources.max_failures=1", "--resume", marks=marks, env=worker, log="2")
    lock = Immutable(d)
    try:
        deadline = time.time() + 300
        while "== Status ==" not in text(root, name, "2"):
            assert p.poll() is None and time.time() < deadline, text(root, name, "2")[-5000:]
            time.sleep(0.5)
        lock.on()
        rc, log = finish(p, root, name, "2")
    finally:
        lock.off()
    assert rc == 2, log[-5000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"lmm-ray sweep: error: the sweep's storage folder {d} cannot be written"), last
    assert "Nothing it finished is lost" in last and "--resume" in last
    assert "exceeding max length" not in log and "sqlite3.OperationalError" not in log

    rc, log = finish(start(root, name, "resources.max_failures=1", "--resume", marks=marks, env=worker, log="3"),
                     root, name, "3")
    assert rc == 0, log[-6000:]
    assert "UpdateFinishedTrialError" not in log
    res = pd.read_csv(d / "results.csv", dtype={"trial_id": str})
    assert len(res) == 3
    rows = by_lr(res)
    assert rows[GOOD]["status"] == "finished" and rows[OTHER]["status"] == "finished"
    assert rows[NONFINITE]["status"] == "failed" and re.match(NONFINITE_REASON, rows[NONFINITE]["reason"]), rows[NONFINITE]
    check_ended_cleanly(d, name, res, log)
    # the trial Optuna had finished was not trained again; the killed worker's trial trained twice, from the start
    assert {p.name for p in marks.glob(f"start.{OTHER:g}.*")} == started_once
    killed = (marks / "killed").read_text()
    starts = sorted(p.name.rsplit(".", 1)[1] for p in marks.glob(f"start.{GOOD:g}.1.*"))
    assert len(starts) == 2 and killed in starts, starts
    return {k: rows[GOOD][k] for k in AGGREGATES}


@pytest.mark.slow
def test_driver_killed_after_optuna_complete_storage_read_only_then_resume(setup, scenarios):
    """The drv scenario (module docstring); the retried trial equals the same trial run plainly."""
    good = scenarios["drv"].result(timeout=1500)
    assert good == pytest.approx(uninterrupted(setup, "drv", GOOD), rel=1e-6, abs=1e-9)


def ctrl_c_then_resume(root: Path) -> dict:
    name = "int"
    d, marks = root / name, root / "int_marks"
    marks.mkdir()
    fault = {"FAULT_KILL_WORKER_LR": str(OTHER)}
    p = start(root, name, "resources.max_failures=0", marks=marks, env=fault, log="1")  # (the default retries once)
    try:
        deadline, running = time.time() + 400, None
        while not (d / "tune" / "tuner.pkl").exists():
            assert p.poll() is None and time.time() < deadline, text(root, name, "1")[-5000:]
            time.sleep(0.5)
        # A second driver on the same sweep is refused with the fix by the name's lock. (--resume: a
        # fresh one is already refused for the name existing; two started at the same instant both
        # pass that check, and the lock is what refuses one of them.)
        second = subprocess.run([sys.executable, "-m", "lmm_ray.cli", "sweep", str(root / "f.yaml"), f"storage={root}",
                                 f"name={name}", "--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2 and "is running now" in second.stderr and "name=" in second.stderr, second.stderr
        while running is None:  # Ctrl-C while the 1e-4 trial trains
            assert p.poll() is None and time.time() < deadline, text(root, name, "1")[-5000:]
            time.sleep(1)
            if (d / "mlflow.db").exists():
                _, children = sweep_runs(d, name)
                running = next((r for r in children if r.info.status == "RUNNING"
                                and json.loads(r.data.tags["lmm_ray.config"])["lr"] == GOOD), None)
        os.kill(p.pid, signal.SIGINT)  # Ctrl-C reaches the driver
        rc, log = finish(p, root, name, "1", timeout=180)
    finally:
        _kill_group(p)
    assert rc == 130, log[-5000:]
    said = [ln for ln in log.splitlines() if ln.startswith("lmm-ray sweep: interrupted")]
    assert said and said[0].startswith("lmm-ray sweep: interrupted — resume with: "), log[-3000:]
    assert said[0].endswith(f"storage={root} name={name} resources.max_failures=0 --resume"), said
    after = log[log.index("Stop signal received"):]  # (before it: Tune's report of the killed worker's trial)
    assert "Traceback" not in after and f"== sweep {name}:" not in log and "Tuner.restore" not in log
    assert not (d / "results.csv").exists()
    parents, children = sweep_runs(d, name)
    assert parents[0].info.status == "KILLED"
    run = {r.info.run_id: r for r in children}[running.info.run_id]
    assert run.info.status == "KILLED" and run.data.tags["lmm_ray.status"] == "interrupted"
    assert not [r for r in children if r.info.status == "RUNNING"]
    # the trial whose worker was killed, with no retry left, failed with a readable reason; the sweep went on
    lost = [r for r in children if json.loads(r.data.tags["lmm_ray.config"])["lr"] == OTHER]
    assert len(lost) == 1 and lost[0].info.status == "FAILED", [r.data.tags for r in lost]
    why = lost[0].data.tags["lmm_ray.reason"]
    assert why.startswith("a training worker died (killed, out of memory or crashed)"), why
    assert f": {why}" in log and "error.txt" in [a.path for a in mlflow_client(d).list_artifacts(lost[0].info.run_id)]

    rc, log = finish(start(root, name, "resources.max_failures=0", "--resume", marks=marks, env=fault, log="2"),
                     root, name, "2")
    assert rc == 0, log[-6000:]
    res = pd.read_csv(d / "results.csv", dtype={"trial_id": str})
    rows = by_lr(res)
    assert len(res) == 3 and rows[GOOD]["status"] == "finished"
    # --resume retries a trial that ended in an error (its worker was killed): it trains again and finishes
    assert rows[OTHER]["status"] == "finished" and len(list(marks.glob(f"start.{OTHER:g}.1.*"))) == 2, rows[OTHER]
    assert rows[NONFINITE]["status"] == "failed" and re.match(NONFINITE_REASON, rows[NONFINITE]["reason"])
    check_ended_cleanly(d, name, res, log, retried={rows[OTHER]["trial_id"]})
    return {k: rows[GOOD][k] for k in AGGREGATES}


@pytest.mark.slow
def test_ctrl_c_then_resume_and_a_worker_killed_without_retries(setup, scenarios):
    """The int scenario (module docstring); the interrupted and resumed trial equals it run plainly."""
    good = scenarios["int"].result(timeout=1500)
    assert good == pytest.approx(uninterrupted(setup, "int", GOOD), rel=1e-6, abs=1e-9)


def test_quiet_teardown_drops_only_a_systemexit_nobody_can_catch():
    """Ray's SIGTERM handler raises SystemExit wherever the dying process is; raised in a `__del__`
    Python hands it to sys.unraisablehook ("Exception ignored in"); quiet_teardown drops that one,
    and only that one."""
    import gc
    import sys

    from lmm_ray.resume import quiet_teardown

    class Dies:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    seen = []
    before = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_type)
    try:
        quiet_teardown()
        installed = sys.unraisablehook
        quiet_teardown()  # (every trial and worker calls it; once per process is enough)
        assert sys.unraisablehook is installed
        Dies(SystemExit(1))
        Dies(ValueError("still shown"))
        gc.collect()
    finally:
        sys.unraisablehook = before
    assert seen == [ValueError]
