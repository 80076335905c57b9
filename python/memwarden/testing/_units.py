"""Byte sizes for the testing toolkit: the package-wide parser, and sizes printed with
one decimal (pytest reports are read at a glance)."""
from __future__ import annotations

from memwarden._units import format_bytes as _format_bytes
from memwarden._units import parse_bytes

__all__ = ["parse_bytes", "format_bytes"]


def format_bytes(n: int | float | None, signed: bool = False) -> str:
    """``format_bytes(3 * 2**20) == "3.0 MiB"``; ``signed=True`` prefixes ``+`` for growth."""
    return _format_bytes(n, signed=signed, digits=1)
