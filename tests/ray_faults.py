"""Fault injection for the Ray Train tests: a worker kills itself once, right after the Train
controller has registered the last checkpoint (a kill within ~2 s of `report` can lose it).
The test registers this module with cloudpickle by value: Ray workers cannot import tests/."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def kill_once_after_checkpoint(marks: Path, run_dir: Path, timeout_s: float = 60.0) -> None:
    """SIGKILL this process, unless a worker already did (marks/killed records its pid)."""
    if (marks / "killed").exists():
        return
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    (marks / "killed").write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
