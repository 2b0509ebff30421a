"""The one exception type that reaches users as a single clear line (exit status 2), and the check every count
the user gives goes through."""

# Counts stay exact in the floating point the models compute with below 2**53, and far from its overflow
MAX_COUNT = 2**53


class OpenLPUError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


def check_count(value, what: str, least: int = 1) -> int:
    """`value` if it is a whole number from `least` (1 or 0) to MAX_COUNT, else one clear error naming `what`."""
    kind = "a positive integer" if least == 1 else "a non-negative integer"
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise OpenLPUError(f"{what} must be {kind}, got {value!r}")
    if value > MAX_COUNT:
        raise OpenLPUError(f"{what} must be {kind} of at most 2**53 ({MAX_COUNT:,}), got one of {len(str(value))} "
                           f"digits")
    return value
