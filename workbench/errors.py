"""One error type for everything a user can get wrong.

A :class:`WorkbenchError` carries a one-line message that names the problem and the fix; the CLI
prints it without a traceback and exits with code 2.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Bad input or an unusable environment, with the fix in the message (one line)."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
