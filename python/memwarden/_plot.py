"""Plots: the one way memwarden makes a matplotlib figure. ``figure()`` returns a
``matplotlib.figure.Figure`` not attached to pyplot (no window, no global state): Jupyter
shows a returned figure inline, elsewhere ``fig.savefig(path)``. matplotlib is the ``plot``
extra; without it a plot raises ImportError saying what to install.

May import: the standard library (matplotlib lazily).
"""
from __future__ import annotations

__all__ = ["figure", "GIB"]

GIB = 2**30


def figure(width: float = 7.0, height: float = 3.5):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("memwarden's plots need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), layout="constrained")
