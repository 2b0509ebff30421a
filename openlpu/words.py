"""Numbers in the text and charts users read: '1 user', '2 users', not '1 user(s)'; 1,807, not 1.81e+03."""

import math


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` with thousands separators and `noun`, or `plural` (default: noun + 's') unless n is 1."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def significant(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant figures, written out (0.0115, 29.8, 1,013): cents would hide a cheap
    model's cost and energy, as a fixed two decimals did (0.01 against 0.04 J per token). A count stays whole."""
    if isinstance(value, int):
        return f"{value:,}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value)))) if value else 0
    return f"{value:,.{decimals}f}"
