"""Device names: the one parser every memwarden function runs its ``device`` argument through.

A device *key* is what accelerate's ``max_memory`` and ``device_map`` use: an ``int``
GPU index, or one of the strings ``"mps"``, ``"cpu"``, ``"disk"``. :func:`device_key`
makes one from any of

* an int >= 0 (a GPU index), or a string of digits: ``0``, ``"1"``;
* ``"cuda:N"`` or ``torch.device("cuda", N)``: ``N``;
* ``"cuda"`` or ``torch.device("cuda")`` (no index): the *current* CUDA device, i.e.
  ``torch.cuda.current_device()`` when torch is imported and CUDA already initialised,
  else 0. Reading it never initialises CUDA (``memwarden.alloc.install("cuda")`` must
  run before PyTorch's CUDA allocator comes up);
* ``"mps"``, ``"cpu"``, ``"disk"`` (and ``torch.device("mps")`` / ``torch.device("cpu")``).

Strings are case-insensitive and surrounding spaces are ignored. Anything else -- a bool,
a negative index, ``"tpu"``, ``"cuda:x"`` -- raises ``ValueError`` naming the argument,
the value and what is accepted.

May import: the standard library only (torch lazily, in :func:`torch_device` and for the
current CUDA device when torch is already loaded).
"""
from __future__ import annotations

import re
import sys
from typing import Any

__all__ = ["device_key", "device_order", "is_accelerator", "torch_device", "memory_device", "SPILL_DEVICES"]

SPILL_DEVICES = ("cpu", "disk")  # max_memory keys that hold spilled weights and compute nothing

_NAMED = ("mps", "cpu", "disk")  # after the GPUs, in accelerate's order
_ACCEPTED = ("a GPU index (int >= 0, '0', 'cuda', 'cuda:N' or torch.device('cuda', N)), "
             "'mps', 'cpu' or 'disk'")
_CUDA_INDEX = re.compile(r"^cuda\s*:\s*([0-9]+)$")


def _current_cuda() -> int:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_device())
    return 0


def _reject(value: Any, name: str, why: str = "") -> ValueError:
    return ValueError(f"{name} must be {_ACCEPTED}; got {value!r}{why}")


def device_key(value: Any, name: str = "device") -> int | str:
    """The accelerate-style key of ``value``: a GPU index (``int``), ``"mps"``, ``"cpu"``
    or ``"disk"``; raises ``ValueError`` naming ``name`` for anything else."""
    if isinstance(value, bool):
        raise _reject(value, name)
    if isinstance(value, int):
        if value < 0:
            raise _reject(value, name, " (a GPU index must be >= 0)")
        return value
    cls = type(value)
    if cls.__module__ == "torch" and cls.__name__ == "device":  # no torch import needed
        if value.type == "cuda":
            return _current_cuda() if value.index is None else int(value.index)
        if value.type in ("cpu", "mps"):
            return value.type
        raise _reject(value, name)
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return int(text)
        if text == "cuda":
            return _current_cuda()
        match = _CUDA_INDEX.match(text)
        if match:
            return int(match.group(1))
        if text in _NAMED:
            return text
    raise _reject(value, name)


def device_order(key: Any) -> tuple:
    """Sort key in accelerate's order: GPUs by index, then ``"mps"``, ``"cpu"``, ``"disk"``
    (``sorted(keys, key=device_order)``; any input :func:`device_key` takes)."""
    key = device_key(key)
    if isinstance(key, int):
        return (0, key)
    return (1, _NAMED.index(key))


def is_accelerator(key: Any) -> bool:
    """Whether the device computes (a GPU or ``"mps"``), as opposed to ``"cpu"``/``"disk"``."""
    return device_key(key) not in SPILL_DEVICES


def memory_device(value: Any, accepted: str, refusal: str) -> str:
    """``"cpu"`` or ``"cuda:N"`` (the names memwarden's allocator and memory readers use)
    from anything :func:`device_key` reads; other devices raise ``ValueError`` saying what
    is ``accepted`` and why the device is refused (``refusal``, given the key)."""
    key = device_key(value)
    if isinstance(key, int):
        return f"cuda:{key}"
    if key == "cpu":
        return key
    raise ValueError(f"device must be {accepted}, got {value!r}: {refusal.format(key=key)}")


def torch_device(value: Any, name: str = "device"):
    """The ``torch.device`` for ``value`` (GPU index ``i`` -> ``cuda:i``); ``"disk"``, which
    holds no tensors, raises ``ValueError``."""
    key = device_key(value, name)
    if key == "disk":
        raise ValueError(f"{name} must be a device that holds tensors (a GPU index, 'mps' or "
                         f"'cpu'); got {value!r}: 'disk' only names offloaded weights")
    import torch
    if isinstance(key, int):
        return torch.device("cuda", key)
    return torch.device(key)
