"""One exception type for user-facing errors: the CLI prints its message as one line, exit code 2."""


class WorkbenchError(Exception):
    """Bad input or an unsupported model, explained in one sentence."""


class RunMismatch(WorkbenchError):
    """The output folder holds a run of a different model, data or settings (resume refused)."""


class WorkbenchWarning(Warning):
    """Something the user should know (input cut, values normalised); the CLI prints it on one line.
    Not a UserWarning, which the CLI silences for third-party libraries."""
