"""Exceptions every stage may raise (a side module: it imports nothing of ours).

``ConfigError`` is bad user input (and, for now, every other one-line failure), raised
with a single-line message that names the bad value and what would be valid; the CLIs
print it as ``error: <message>`` and exit with status 2, without a traceback.
``TrainingStopped`` is a requested stop, raised from the buffer's fill and the trainer.
"""


class ConfigError(ValueError):
    """Bad user input (config value, path, dataset column, ...). The message is one line."""


class TrainingStopped(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM), after writing a checkpoint where
    there was something to keep. Not an error: the CLI exits with 130 and prints nothing more."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step
