"""Errors that speak to the user.

Everything raised as :class:`MacscError` is a problem with the user's input (a file, an option,
a value) whose message already says what is wrong and what to do; the ``macsc`` command prints it
as one line and exits with status 2 instead of showing a traceback.
"""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none): what a
    one-line error quotes of the library error behind it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class MacscError(Exception):
    """A user-facing error: the message names the file, option or value and the fix."""

    #: the most recently created one: jsonargparse re-wraps errors raised while it instantiates
    #: a subclass-mode argument into a ValueError, and the CLI recovers ours through this
    last: "MacscError | None" = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        MacscError.last = self


class DataError(MacscError, ValueError):
    """A data file or split is missing, malformed, empty, or holds a bad value."""


class ConfigError(MacscError, ValueError):
    """An option has an unknown or inconsistent value."""


class CheckpointError(MacscError, ValueError):
    """A checkpoint is missing, of another layout, or not safe to load."""


class NonFiniteLossError(MacscError, FloatingPointError):
    """A loss term became NaN or Inf during training; the message names the term and the step."""


class CommandLineError(MacscError):
    """An option or config key the command does not know, or a value it cannot parse.

    Not a ValueError on purpose: the argument parser must not mistake it for one of its own
    recoverable errors."""
