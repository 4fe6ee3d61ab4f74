"""User-facing errors.

A `UserError` is something the user can fix (bad config, missing data, bad payload). The CLI prints its
message as one line and exits with code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line (exit code 2)."""
