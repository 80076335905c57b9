"""Byte sizes: parse ``"16GiB"``, ``"16 GB"``, ``1.5e9`` or ``1024`` and format them back.

The rule: a number (an ``int``, or a finite ``float``) is a count of bytes; a string
needs a unit (``"512"`` is rejected: write ``"512B"`` or ``"512 MiB"``), so a size read
from a command line or a config file is never taken for bytes by accident. Decimal units
(kB, MB, GB, TB, PB, or k/M/G/T/P) are powers of 1000, binary ones (KiB, MiB, GiB, TiB,
PiB, or Ki/Mi/Gi/Ti/Pi) powers of 1024; units are case-insensitive and a space between
number and unit is optional. This is the package-wide helper: every size a memwarden
function accepts goes through :func:`parse_bytes`, every size it prints through
:func:`format_bytes`.

May import: the standard library only.
"""
from __future__ import annotations

import re

__all__ = ["parse_bytes", "format_bytes"]

_UNITS = {
    "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4, "pi": 1024**5, "pib": 1024**5,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str, name: str = "size") -> int:
    """Return a byte count from an int or float (bytes) or a string with a unit (``"2 GiB"``).

    Raises ``ValueError`` naming ``name`` and the value for negative numbers, strings
    without a unit or with an unknown one, NaN/inf, bools and other types.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, float or string like '2 GiB', got {value!r}")
    if isinstance(value, int):
        number, mult = value, 1
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value!r}")
        number, mult = value, 1
    elif isinstance(value, str):
        m = _RE.match(value)
        if m and not m.group(2):
            raise ValueError(f"cannot parse {name} {value!r}: give a unit, e.g. '48GiB' "
                             f"(or '{m.group(1)}B' for bytes)")
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot parse {name} {value!r}: expected a number with a unit "
                "(B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '16GiB'")
        number, mult = float(m.group(1)), _UNITS[m.group(2).lower()]
    else:
        raise ValueError(
            f"{name} must be an int, float or string like '2 GiB', got {type(value).__name__}")
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return int(round(number * mult))


def format_bytes(n: int | float | None, signed: bool = False, digits: int = 2) -> str:
    """``format_bytes(3 * 2**20) == "3.00 MiB"``; ``signed=True`` prefixes ``+`` for growth."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ("+" if signed and n > 0 else "")
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def byte_unit(largest: int | float) -> tuple[int, str]:
    """``(divisor, name)`` of the unit :func:`format_bytes` picks for ``largest``: one
    unit for a plot axis of byte counts (``byte_unit(3 * 2**20) == (2**20, "MiB")``)."""
    name = format_bytes(max(largest, 0)).split()[-1]
    return 1024 ** ("B", "KiB", "MiB", "GiB", "TiB").index(name), name
