"""Who may read a sweep's folder, and whom `--resume` trusts (docs/cluster.md, "Who can read and
change a sweep's folder").

A sweep's folder holds the params and metrics of a team's runs (sweep.json, results.csv, the
MLflow and Optuna databases, checkpoints). A local sweep folder lmm_ray creates is therefore
private to its user (mode 0o700, `make_sweep_dir`), and `lmm-ray sweep` writes with umask 0o077
(`private_umask`), so its files are too; a team that shares a storage folder opens a sweep up on
purpose (`chmod -R g+rX runs/<name>`).

`--resume` unpickles Ray Tune's state from the folder (tuner.pkl, the searcher's state, and the
experiment state, whose non-JSON parts are cloudpickled): whoever can write there can run code in
the driver. `check_resume_trust` refuses, before anything is read, a folder or file in it that
another user owns or that others may write. Object storage (s3://, gs://) cannot be checked here:
its bucket's access policy is the guard.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lmm_ray.errors import ConfigError
from lmm_ray.schema import is_uri

SWEEP_DIR_MODE = 0o700
SWEEP_UMASK = 0o077
TUNE_DIR = "tune"  # sweep.TUNE_DIR (not imported: sweep.py imports Ray)


def private_umask() -> int:
    """Files the driver (and the Ray it starts) writes are its user's only; returns the old umask."""
    return os.umask(SWEEP_UMASK)


def make_sweep_dir(folder: Path) -> None:
    """The sweep folder, created private (an existing one keeps the mode its user gave it); the
    storage folders above it are created with the usual mode, since a team may share them."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=SWEEP_DIR_MODE)
    except FileExistsError:
        pass


def _untrusted(path: Path, uid: int) -> str | None:
    """Why `path` could hold someone else's code (None: only its owner, this user, can change it)."""
    st = os.stat(path)  # follows a symbolic link: the target is what is read
    if st.st_uid != uid:
        try:
            import pwd

            owner = pwd.getpwuid(st.st_uid).pw_name
        except (ImportError, KeyError):
            owner = f"uid {st.st_uid}"
        return f"{path} is owned by {owner}, not by you"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "everyone" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{path} can be written by {who} (mode {stat.filemode(st.st_mode)})"
    return None


def check_resume_trust(sweep_dir: str, resume: bool = True) -> None:
    """Before `--resume` unpickles Tune's state from a local sweep folder: the folder, its Tune
    folder and every file and folder in that are this user's and not writable by others.
    Nothing to check for a new sweep, object storage, or a folder without Tune state (the
    caller says "nothing to resume")."""
    if not resume or is_uri(sweep_dir):
        return
    folder = Path(sweep_dir)
    tune = folder / TUNE_DIR
    if not (tune / "tuner.pkl").exists():
        return
    uid = os.getuid()
    paths = [folder, tune]
    for root, dirs, files in os.walk(tune):
        paths += [Path(root) / n for n in (*dirs, *files)]
    for p in paths:
        why = _untrusted(p, uid)
        if why is not None:
            raise ConfigError(
                "storage", f"--resume would load Ray Tune's pickled state from {folder}, but {why}: whoever can write "
                "there can run code in this process",
                f"if the folder is yours and trusted: chown -R $USER {folder} && chmod -R go-w {folder}; "
                "otherwise start a new sweep (name=...) instead of resuming this one")
