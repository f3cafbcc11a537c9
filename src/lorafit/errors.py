"""The user's-mistake error.

A `UserError` is something the person running lorafit can fix (a bad recipe key, a missing file, a malformed row).
The CLI prints its message as one line and exits with `EXIT_USER_ERROR`; anything else is a bug and keeps its
traceback. Messages name the file, row, key or value and say what to do.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
# Exit code of a run that stopped on a signal after saving a checkpoint, to be resumed (`--resume auto`).
EXIT_STOPPED_TO_RESUME = 75  # EX_TEMPFAIL from sysexits.h: "try again later"


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one line, whatever the caller wrote
