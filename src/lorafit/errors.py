"""Errors and exit codes: the one table every entry point (src/train.py, generate.py, merge.py) answers by.

| exit | meaning                                                                              | status.json state  |
|------|--------------------------------------------------------------------------------------|--------------------|
| 0    | finished (or the folder held a finished run)                                         | finished           |
| 1    | a bug: a traceback on the console and in RUN/log.txt                                 | failed             |
| 2    | a user's mistake, one line `lorafit: error: ...` (bad recipe, data, path, checkpoint, | failed, or none if |
|      | a full disk); before the run folder changed, nothing in it did                      | nothing changed    |
| 3    | the run learned nothing usable: a non-finite adapter, every step skipped (failed), or | failed /           |
|      | too many non-finite steps in a row (stopped_nonfinite); the last good checkpoint stays | stopped_nonfinite  |
| 75   | stopped on a signal with a checkpoint; run again to resume (EX_TEMPFAIL)             | stopped_to_resume  |
| 130  | interrupted (Ctrl-C)                                                                 | failed             |

`accelerate launch` turns any non-zero exit of its child into 1, so wrappers read RUN/status.json instead.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_STOPPED_TO_RESUME = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2. Messages name the file, row, key or value and
    say what to do."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one line, whatever the caller wrote


class RunFailed(UserError):
    """A run that trained but learned nothing usable (a non-finite adapter, every step skipped): one line, exit 3."""

    exit_code = EXIT_NONFINITE


def exit_code_for(error: BaseException | None) -> int:
    if error is None:
        return EXIT_OK
    if isinstance(error, UserError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_BUG
