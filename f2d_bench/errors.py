"""User-facing errors: the CLI prints these as one clear message, without a traceback."""


class F2DBenchError(Exception):
    """An error caused by input, configuration or environment that the user can fix.

    The message names the file, line, key or value at fault and says what to do.
    """


class ConfigError(F2DBenchError):
    """A run config, preset or CLI value is invalid."""


class ReadFailure(F2DBenchError):
    """The file system failed to read a file (EIO, EMFILE, ENOMEM, ...): nothing says the file is bad,
    so it is never recorded as the file's fault; running again may succeed."""


class ModelUnavailableError(F2DBenchError):
    """Model weights could not be found locally and could not be downloaded."""
