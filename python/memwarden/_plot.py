"""Plots: the one way memwarden makes a matplotlib figure. ``figure()`` returns a
``matplotlib.figure.Figure`` not attached to pyplot (no window, no global state): Jupyter
shows a returned figure inline, elsewhere ``fig.savefig(path)``. matplotlib is the ``plot``
extra; without it a plot raises ImportError saying what to install.

Inline display: IPython shows a Figure only once a format is registered for it, which the
inline backend does when pyplot is imported. A figure made without pyplot would show as
``<Figure size ...>``, so ``figure()`` registers PNG in a running IPython that has no
format for figures yet (a format the user or a backend chose is left as it is).

May import: the standard library (matplotlib lazily; IPython only when already loaded).
"""
from __future__ import annotations

import sys

__all__ = ["figure", "GIB"]

GIB = 2**30


def figure(width: float = 7.0, height: float = 3.5):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("memwarden's plots need matplotlib: pip install matplotlib") from None
    _register_inline_display(Figure)
    return Figure(figsize=(width, height), layout="constrained")


_FIGURE_FORMATS = ("image/png", "image/svg+xml", "image/jpeg", "application/pdf")


def _register_inline_display(figure_type) -> None:
    """In a running IPython (a notebook) without a display format for figures, show them as PNG."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters:
        return
    for mime in _FIGURE_FORMATS:
        try:
            formatters[mime].lookup_by_type(figure_type)
            return  # a format is chosen already (the inline backend, %config, the user)
        except (KeyError, TypeError):
            continue
    from functools import partial

    from IPython.core.pylabtools import print_figure

    formatters["image/png"].for_type(figure_type, partial(print_figure, fmt="png", base64=True))
