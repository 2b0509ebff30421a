"""The one exception type that reaches users as a single clear line (exit status 2)."""


class OpenLPUError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""
