"""`lmm-ray` with faults injected, for tests/test_faults.py: `python tests/fault_driver.py sweep FILE ...`.

Environment variables choose the faults (each happens once per marks folder):
- FAULT_MARKS: a folder for the marks below (required);
- FAULT_KILL_WORKER_LR=<lr>: the Ray Train worker of the trial with this learning rate SIGKILLs
  itself at the second training step of its first stage (marks/killed holds its pid). Every stage start
  leaves marks/start.<lr>.<stage>.<pid>, so a test can tell which trials trained again;
- FAULT_KILL_DRIVER_AFTER_TELL=1: the driver SIGKILLs itself right after Optuna records its first
  COMPLETE trial, before Tune saves that the trial ended: Optuna has it COMPLETE, Tune's saved
  state RUNNING (the state issue 16 saw make every --resume crash).
The worker-side wrapper reaches Ray workers by value (cloudpickle pickles this `__main__`'s
functions by value); the workers cannot import tests/.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

MARKS = Path(os.environ["FAULT_MARKS"])
KILL_LR = os.environ.get("FAULT_KILL_WORKER_LR")


def faulty_train_loop(config: dict, marks: str = str(MARKS), kill_lr: str | None = KILL_LR) -> None:
    import lmm_ray.train as T
    from lmm_ray.sweep import quiet_train_loop

    lr = float(config["trial"]["lr"])
    real = T.train_stage

    def wrapped(model, encs, **kw):
        folder = Path(marks)
        (folder / f"start.{lr:g}.{kw['stage']}.{os.getpid()}").touch()
        if kill_lr is not None and abs(lr - float(kill_lr)) < 1e-12 and not (folder / "killed").exists():
            # At the stage's second forward (step 2 of 3): mid-stage whatever the machine's speed (a
            # timer fired after a fast stage had ended and been checkpointed, and nothing trained again).
            calls = []

            def kill_at_second_forward(module, args):
                calls.append(1)
                if len(calls) == 2:
                    (folder / "killed").write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)

            model.register_forward_pre_hook(kill_at_second_forward)
        return real(model, encs, **kw)

    T.train_stage = wrapped
    quiet_train_loop(config)


def main() -> int:
    from lmm_ray import cli, sweep

    # make_trial_fn's closure takes this global (by value: __main__) when the trial is pickled for Ray
    sweep.quiet_train_loop = faulty_train_loop
    if os.environ.get("FAULT_KILL_DRIVER_AFTER_TELL") == "1":
        from optuna.trial import TrialState

        tell = sweep.StageAwareOptunaSearch.on_trial_complete

        def on_trial_complete(self, trial_id, result=None, error=False):
            tell(self, trial_id, result, error)
            ot = self._ot_trials.get(trial_id)
            if ot is not None and self._ot_study._storage.get_trial(ot._trial_id).state == TrialState.COMPLETE:
                (MARKS / "driver_killed").write_text(trial_id)
                os.kill(os.getpid(), signal.SIGKILL)

        sweep.StageAwareOptunaSearch.on_trial_complete = on_trial_complete
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
