"""User-facing errors: the CLI prints these as one clear message, without a traceback."""


class F2DBenchError(Exception):
    """An error caused by input, configuration or environment that the user can fix.

    The message names the file, line, key or value at fault and says what to do.
    """


class ConfigError(F2DBenchError):
    """A run config, preset or CLI value is invalid."""


class ModelUnavailableError(F2DBenchError):
    """Model weights could not be found locally and could not be downloaded."""
