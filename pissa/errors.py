"""The one exception type the CLI turns into a one-line message and exit code 2."""


class PissaError(ValueError):
    """Bad input from the user: the message names the problem and the fix.

    It subclasses ValueError so that library callers can catch it like any validation error.
    """
