"""The one exception type for bad user input.

Raised with a single-line message that names the bad value and what would be valid; the
CLIs print it as ``error: <message>`` and exit with status 2, without a traceback.
"""


class ConfigError(ValueError):
    """Bad user input (config value, path, dataset column, ...). The message is one line."""
