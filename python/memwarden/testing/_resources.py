"""GpuResources: per-test memory budgets out of a session-wide capacity."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from . import _sources as src
from memwarden._units import format_bytes, parse_bytes

__all__ = ["GpuResources", "Reservation", "InsufficientMemory"]


class InsufficientMemory(RuntimeError):
    """A reservation does not fit (the pytest fixture turns it into a skip)."""


@dataclass
class Reservation:
    manager: "GpuResources"
    device: str
    nbytes: int
    owner: str | None
    released: bool = False

    def release(self) -> None:
        self.manager._release(self)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class GpuResources:
    """Book-keeping of memory budgets per device.

    ``capacity`` per device defaults to the device's free memory when first used (CUDA:
    the driver's free memory; CPU: available host memory) minus ``headroom``. A
    reservation fails with :class:`InsufficientMemory` when the sum of the live
    reservations would pass the capacity or when the device does not have that much free
    memory right now. Reservations made through the ``gpu_resources`` fixture are
    released when the test that made them ends.
    """

    def __init__(self, capacity: dict[str, Any] | Any | None = None, headroom: Any = 0,
                 default_device: Any = None):
        self.default_device = default_device
        self.headroom = parse_bytes(headroom)
        if capacity is None or isinstance(capacity, dict):
            self._capacity = {src.resolve_device(k): parse_bytes(v) for k, v in (capacity or {}).items()}
            self._fixed = None
        else:
            self._capacity, self._fixed = {}, parse_bytes(capacity)
        self._live: list[Reservation] = []
        self._lock = threading.Lock()
        self.owner: str | None = None  # the current test (set by the plugin)

    def capacity(self, device: Any = None) -> int:
        dev = src.resolve_device(device if device is not None else self.default_device)
        with self._lock:
            if dev not in self._capacity:
                if self._fixed is not None:
                    self._capacity[dev] = self._fixed
                else:
                    free, _ = src.free_and_total(dev)
                    self._capacity[dev] = max(0, free - self.headroom)
            return self._capacity[dev]

    def reserved(self, device: Any = None) -> int:
        dev = src.resolve_device(device if device is not None else self.default_device)
        with self._lock:
            return sum(r.nbytes for r in self._live if r.device == dev)

    def available(self, device: Any = None) -> int:
        return self.capacity(device) - self.reserved(device)

    def reserve(self, size: Any, device: Any = None) -> Reservation:
        """Reserve ``size`` ("4 GiB", bytes) on ``device``; raises InsufficientMemory."""
        nbytes = parse_bytes(size)
        dev = src.resolve_device(device if device is not None else self.default_device)
        if src.device_type(dev) == "cuda" and not src.cuda_available():
            raise InsufficientMemory(f"cannot reserve {format_bytes(nbytes, digits=1)} on {dev}: CUDA is not available")
        cap = self.capacity(dev)
        free, _ = src.free_and_total(dev)
        with self._lock:
            used = sum(r.nbytes for r in self._live if r.device == dev)
            if used + nbytes > cap:
                raise InsufficientMemory(
                    f"cannot reserve {format_bytes(nbytes, digits=1)} on {dev}: {format_bytes(used, digits=1)} of the "
                    f"{format_bytes(cap, digits=1)} budget is already reserved")
            if nbytes > free:
                raise InsufficientMemory(
                    f"cannot reserve {format_bytes(nbytes, digits=1)} on {dev}: only {format_bytes(free, digits=1)} free")
            r = Reservation(self, dev, nbytes, self.owner)
            self._live.append(r)
            return r

    def _release(self, r: Reservation) -> None:
        with self._lock:
            if not r.released:
                r.released = True
                self._live.remove(r)

    def release_owner(self, owner: str) -> int:
        """Release every reservation made by ``owner``; returns how many."""
        with self._lock:
            mine = [r for r in self._live if r.owner == owner]
        for r in mine:
            r.release()
        return len(mine)

    def __repr__(self) -> str:
        return f"GpuResources(capacity={self._capacity}, live={len(self._live)})"
