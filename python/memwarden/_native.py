"""The native extension, loaded on first use.

:func:`load` imports torch (the extension links against the torch already in the
process), then ``memwarden._C``, which registers the tensor ops as
``torch.ops.memwarden.*`` and holds the pybind11 modules of the core (``_C.alloc``,
``_C.kv``, ``_C.plan``, ...). It runs once per process; every module that needs the
extension calls it instead of importing ``memwarden._C`` itself, so ``import memwarden``
stays free of torch.

May import: torch and ``memwarden._C`` only (bottom layer but one: nothing of memwarden
above ``_units``/``_devices``/``_table``).
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

__all__ = ["load"]


@functools.cache
def load() -> ModuleType:
    """Import torch and the extension (registering ``torch.ops.memwarden.*``); returns ``_C``."""
    import torch  # noqa: F401  (must precede the extension: it resolves libtorch's symbols)

    # import_module, not ``from memwarden import _C``: that form would ask the package's
    # __getattr__, which calls back here.
    return importlib.import_module("memwarden._C")
