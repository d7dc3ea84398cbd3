"""One exception type for user-facing errors: the CLI prints its message as one line, exit code 2."""


class WorkbenchError(Exception):
    """Bad input or an unsupported model, explained in one sentence."""


class RunMismatch(WorkbenchError):
    """The output folder holds a run of a different model, data or settings (resume refused)."""
