"""Exceptions every stage may raise (a side module: it imports nothing of ours).

Every failure a user can act on is a ``ConfigError`` or one of its kinds below, raised
with a single-line message that names what is wrong and what would work. The CLIs print
it as ``error: <message>`` and exit with status 2, without a traceback; with the
environment variable ``SAE_DEBUG=1`` they also print the traceback and the exception
that caused it (raise sites use ``from None`` to keep the line clean, but Python keeps the
cause as ``__context__``). Library callers catch the kind they care about.
"""


class ConfigError(ValueError):
    """A failure explained in one line. Raised as such: bad user input (a config value,
    a path, a dataset column, ...)."""


class DataError(ConfigError):
    """The data cannot be read or holds nothing usable: a dataset, an activation cache."""


class CheckpointError(ConfigError):
    """A checkpoint or saved SAE is missing, damaged, or belongs to another run."""


class DivergedError(ConfigError):
    """Training produced NaN or inf (in the activations, the loss or the weights)."""


class DistributedError(ConfigError):
    """Another process of a torchrun run failed or timed out, or the split does not work."""


class StorageError(ConfigError):
    """A file could not be written: a full disk, a missing permission, a folder in use."""


class TrainingStopped(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM), after writing a checkpoint where
    there was something to keep. Not an error: the CLI exits with 130 and prints nothing more."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step
