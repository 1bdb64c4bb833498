"""Where a person reads a sweep's results: the MLflow UI (a lean server, its port checked first,
the direct URL of the runs table), the command that opens it, and the Optuna dashboard.

MLflow 3 opens an experiment in its GenAI view ("Traces"); the runs table is the experiment's
`runs` page with `?workflowType=machine_learning`, and the experiment is tagged as a model
development one (tracking.experiment_id), so the UI shows runs first. A default `mlflow server`
takes ~2-3 GB of memory (job execution workers, 4 web workers); `LEAN_ENV` and one worker keep it
near 0.5 GB.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import quote

from lmm_ray.schema import is_uri

HOST = "127.0.0.1"
LEAN_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes (GenAI jobs only)


def port_busy(port: int, host: str = HOST) -> bool:
    """True when something already listens on host:port (or the port cannot be bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def base_url(port: int, host: str = HOST) -> str:
    return f"http://{host}:{port}"


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in the model-training view (not the GenAI traces page): the
    trial runs (the sweep's own run nests them, collapsed), best objective first."""
    from urllib.parse import urlencode

    query = {"workflowType": "machine_learning", "searchFilter": "tags.`lmm_ray.role` = 'trial'",
             "orderByKey": "metrics.`objective`", "orderByAsc": "false"}
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def command() -> str:
    """`lmm-ray` as the user can type it: the bare name when it is on PATH, else the script next
    to this Python (a virtual environment that is not activated, as after `make sweep`), else
    `python -m lmm_ray.cli`."""
    here = Path(sys.executable).parent / "lmm-ray"
    found = shutil.which("lmm-ray")
    if found and (not here.exists() or Path(found).resolve() == here.resolve()):
        return "lmm-ray"
    if here.exists():
        try:
            return os.path.relpath(here) if not os.path.relpath(here).startswith("..") else str(here)
        except ValueError:  # another drive (Windows)
            return str(here)
    return f"{sys.executable} -m lmm_ray.cli"


def sweep_ids(uri: str, experiment: str, sweep: str) -> tuple[str | None, str | None]:
    """(experiment id, parent run id) of a sweep in its tracking store; None where missing."""
    from lmm_ray import tracking

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None, None
    found = c.search_runs([exp.experiment_id], f"tags.`lmm_ray.sweep` = '{sweep}' and tags.`lmm_ray.role` = '{tracking.PARENT}'",
                          max_results=1)
    return exp.experiment_id, (found[0].info.run_id if found else None)


def server_argv(uri: str, port: int, host: str = HOST, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", str(workers)]


def serve(argv: list[str], env: dict) -> int:
    """Become the MLflow server (exec: this process's own ~0.3 GB of imports is not kept alive
    beside it); where exec is not available, run it as a child and wait."""
    sys.stdout.flush()
    sys.stderr.flush()
    if hasattr(os, "execve") and os.name == "posix":
        os.execve(argv[0], argv, env)
    import subprocess

    return subprocess.call(argv, env=env)


def urls_text(base: str, experiment_id: str | None, parent_id: str | None) -> list[str]:
    if experiment_id is None:
        return [f"{base} (this sweep has no experiment there yet)"]
    out = [f"runs table: {runs_url(base, experiment_id)}"]
    if parent_id:
        out.append(f"sweep run:  {run_url(base, experiment_id, parent_id)}  (results, Pareto front, plots)")
    return out


def where_to_look(cfg, experiment_id: str | None, parent_id: str | None, port: int = 5000) -> str:
    """The lines a sweep ends with: how to open MLflow on its runs, and the Optuna dashboard."""
    local = cfg.mlflow_uri.startswith("sqlite:")
    lines = [f"MLflow:  experiment {cfg.experiment!r} ({cfg.mlflow_uri})"]
    if local:
        lines.append(f"         open it:  {command()} ui {cfg.sweep_dir}" + (f" --port {port}" if port != 5000 else ""))
        base = base_url(port)
    else:  # a tracking server: its own UI
        base = cfg.mlflow_uri.rstrip("/")
    lines += ["         " + u for u in urls_text(base, experiment_id, parent_id)]
    db = Path(cfg.sweep_dir) / "optuna.db"
    if not is_uri(cfg.sweep_dir) and db.exists():
        lines.append(f"Optuna:  optuna-dashboard sqlite:///{db.resolve()}   (pip install optuna-dashboard; "
                     f"study {cfg.name!r}, trial numbers as in the run names' #)")
    return "\n".join(lines)
