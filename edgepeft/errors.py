"""User-facing errors.

Every problem a user can fix is an :class:`EdgepeftError`: the CLI prints it as one
line (what was asked, what was found, how to fix it) and exits with status 2.
Anything else is a bug and keeps its traceback under ``--debug``.
"""

from __future__ import annotations

EXIT_USAGE = 2


class EdgepeftError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem}. {self.fix}" if self.fix else f"{self.problem}."


class ConfigError(EdgepeftError):
    """A config field got a value outside what it allows."""

    def __init__(self, field: str, value, allowed: str, source: str | None = None):
        where = f" in {source}" if source else ""
        super().__init__(f"{field}={value!r}{where} is not allowed", f"Allowed: {allowed}")
        self.field = field


class MismatchError(EdgepeftError):
    """An adapter or artifact does not fit the base it is paired with."""


class IntegrityError(EdgepeftError):
    """A file is truncated, corrupt, or fails its hash check."""


class VerificationError(EdgepeftError):
    """An artifact missed its tolerance against the PyTorch reference; ``records`` holds every check."""

    EXPORT_FIX = ("Nothing was written under a final name. The writer or its input is wrong; rerun with --debug and "
                  "report it, or pass --no-verify to keep an unverified artifact")

    TASK_FIX = ("Nothing was written under a final name. This type loses the fine-tune's own task: keep the adapter "
                "separate (--mode separate), pick a higher --quant, or pass --no-verify to keep it anyway")

    def __init__(self, what: str, records: list, failed: str, fix: str | None = None):
        super().__init__(f"{what} failed verification against the PyTorch fp32 reference: {failed}",
                         fix or self.EXPORT_FIX)
        self.records = records
