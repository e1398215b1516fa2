"""Errors the application reports as one line and exit code 2: the user asked for something
that cannot work (a typo, a missing data set), as opposed to a bug in q8."""


class UsageError(Exception):
    """A configuration or input error; train.py prints its message, not a traceback."""


class DatasetNotFoundError(UsageError):
    """A data set is not where the configuration says; the message says how to get it."""


class CheckpointWriteError(UsageError):
    """A checkpoint could not be written (disk full, quota, file size limit); the previous
    checkpoint at that path is left as it was."""
