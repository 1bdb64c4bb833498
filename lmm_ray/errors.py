"""The errors a user can fix. The CLI catches `UserError` (and only it): one clear message, exit 2.

Every module raises the subclass of its concept; nothing imports `lmm_ray.cli` to get them, so
errors flow downward with the other dependencies. An exception that is not a `UserError` is a bug
in lmm_ray and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback, exit code 2."""


class ConfigError(UserError, ValueError):
    """A sweep or search-space value that cannot be used; `field` is its dotted path."""

    def __init__(self, field: str, problem: str, fix: str = "", source: str | None = None):
        self.field, self.problem, self.fix, self.source = field, problem, fix, source
        super().__init__(field, problem, fix, source)

    def __str__(self) -> str:
        where = ": ".join(x for x in (self.source, self.field) if x)
        return f"{where}: {self.problem}" + (f"\n  fix: {self.fix}" if self.fix else "")


class ClusterError(ConfigError):
    """The connected Ray cluster cannot run this sweep as configured; `field` names the key to change."""


class RecipeError(UserError, ValueError):
    """A recipe that does not parse, or does not resolve on a model."""


class DataError(UserError, ValueError):
    """A dataset source that cannot be read as skill samples; the message names the source and the fix."""


class SweepError(UserError):
    """A sweep that cannot start or resume (name taken, nothing to resume, no results)."""


class ResultsNotFound(UserError, FileNotFoundError):
    """A folder that holds no sweep results (yet)."""


class Interrupted(Exception):
    """The user stopped a sweep (Ctrl-C). Not a mistake, so not a UserError: the CLI prints one line
    with the command that resumes it and exits 130 (128 + SIGINT, what a shell reports for Ctrl-C).
    `resumable`: whether Tune saved a state that --resume can start from."""

    exit_code = 130

    def __init__(self, message: str = "interrupted", resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable
