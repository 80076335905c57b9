"""memwarden: keep LLM inference inside its memory.

``import memwarden`` is light: it imports neither torch nor the native extension. The
submodules load what they need when they are imported: :mod:`memwarden.quant`,
:mod:`memwarden.kv` and :mod:`memwarden.alloc` load the extension (and with it
``torch.ops.memwarden.*``). Every public submodule (``alloc``, ``controller``,
``estimate``, ``footprint``, ``kv``, ``models``, ``plan``, ``quant``, ``serve``,
``testing``) is also reachable as an attribute after a plain ``import memwarden``
(``memwarden.plan.plan(...)``), imported on first use. Code that
calls ``torch.ops.memwarden.*`` directly calls :func:`load_ops` first.
"""
from __future__ import annotations

import importlib
from typing import Any

from memwarden._native import load as load_ops
from memwarden._version import __version__

__all__ = ["__version__", "load_ops"]

# Submodules imported on first attribute access (PEP 562).
_LAZY_SUBMODULES = frozenset({"alloc", "controller", "estimate", "footprint", "kv", "models", "plan", "quant",
                              "serve", "testing", "top"})


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"memwarden.{name}")
    if name == "_C":  # ``from memwarden import _C`` loads torch first
        return load_ops()
    raise AttributeError(f"module 'memwarden' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)
