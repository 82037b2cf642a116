"""One exception type for every bad input a user can cause; the CLI turns it into `error: ...`, exit 2."""


class UserError(Exception):
    """A problem with what the user asked for (bad name, bad file, bad option), not a bug.

    The message must say what is wrong and what to do, in one line.
    """


class RunFailed(Exception):
    """A run that cannot go on (e.g. the loss became NaN); the message says what was kept and what to try."""
