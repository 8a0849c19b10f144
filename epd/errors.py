"""User-facing errors: the CLI prints them without a traceback and exits non-zero."""


class EPDError(Exception):
    """An error caused by user input (a file, a flag, a config value); the message names it and the fix."""


class ConfigError(EPDError, ValueError):
    """A config or argument value is invalid."""


class NonFiniteError(EPDError, FloatingPointError):
    """NaN or inf appeared in a computation; the message names where (step, sigma, seed, prompt)."""
