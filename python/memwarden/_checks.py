"""Argument checks shared by every layer: one definition of "an integer argument".

An integer argument is anything with ``__index__`` (``int``, numpy integers) except
``bool``; floats and strings are not integers. A bad value raises ``ValueError`` naming
the argument, the range and what was given. Imports nothing.
"""
from __future__ import annotations

import operator
from typing import Any

__all__ = ["integer", "INT32_MAX", "INT64_MAX"]

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1  # what an op schema's ``int`` holds


def _describe(minimum: int, maximum: int | None) -> str:
    if maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    return f"an integer >= {minimum}"


def integer(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None, where: str = "") -> int:
    """``value`` as an ``int`` if it is an integer in ``[minimum, maximum]``, else
    ``ValueError("{where}{name} must be a positive integer, got ...")``."""
    wanted = _describe(minimum, maximum)
    if isinstance(value, bool):
        raise ValueError(f"{where}{name} must be {wanted}, got {value!r} (a bool)")
    try:
        number = operator.index(value)
    except TypeError:
        kind = "a string" if isinstance(value, str) else type(value).__name__
        raise ValueError(f"{where}{name} must be {wanted}, got {value!r} ({kind})") from None
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{where}{name} must be {wanted}, got {number}")
    return number
