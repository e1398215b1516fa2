"""Errors the application reports as one line, without a traceback: a UsageError (exit code 2)
when the user asked for something that cannot work (a typo, a missing data set), as opposed to
a bug in q8; a NonFiniteError (exit code 1) when training diverged."""


class UsageError(Exception):
    """A configuration or input error; train.py prints its message, not a traceback."""


class DatasetNotFoundError(UsageError):
    """A data set is not where the configuration says; the message says how to get it."""


class CheckpointWriteError(UsageError):
    """A checkpoint could not be written (disk full, quota, file size limit); the previous
    checkpoint at that path is left as it was."""


class NonFiniteError(RuntimeError):
    """Training met a NaN or inf (callbacks.nan_guard.NanGuard); the message names the first
    layer and tensor."""


class StoppedBySignal(BaseException):
    """SIGTERM or SIGUSR1 outside a training loop (start-up, the test after fit), where no
    checkpoint is saved: train.py stops the ranks it started and exits with 143. During fit,
    ResumableCheckpoint handles the signal instead and saves last.ckpt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @staticmethod
    def raise_on(signum: int, frame: object) -> None:
        """The signal handler train.py installs."""
        raise StoppedBySignal(signum)
