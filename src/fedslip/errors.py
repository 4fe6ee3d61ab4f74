"""User-facing errors.

A `UserError` is something the user can fix (bad config, missing data, bad payload). The CLI prints its
message as one line and exits with code 2. Anything else is a bug and keeps its traceback. Where the run
can honestly go on, `warn` says what it did instead, in one line.
"""

import sys


class UserError(Exception):
    """A problem with the user's input, reported as one clear line (exit code 2)."""


def warn(message: str) -> None:
    """One plain line on stderr, printed each time it is called (`warnings.warn` would add the source line,
    and its filters could hide it or show it twice)."""
    print(f"fedslip: warning: {message}", file=sys.stderr)
