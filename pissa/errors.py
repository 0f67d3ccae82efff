"""The exception types the CLI turns into a one-line message and exit code 2."""


class PissaError(ValueError):
    """Bad input from the user: the message names the problem and the fix.

    It subclasses ValueError so that library callers can catch it like any validation error.
    """


class LostContact(PissaError):
    """A collective failed or timed out under torchrun or mlx.launch: another rank died or hung.
    Every surviving rank raises it (and says so), since none can know whether the others saw it."""


class PeerFailed(PissaError):
    """Another rank failed and reports why itself; this rank stops without a message of its own,
    so that a job prints one line however many ranks it has."""
