"""reset_memory(): a complete cleanup with a before/after report."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import _sources as src
from memwarden._units import format_bytes

__all__ = ["reset_memory", "ResetReport", "wait_for"]


def wait_for(condition: Callable[[], bool], timeout: float = 2.0, interval: float = 0.005) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds pass; returns its last value.
    The poll interval doubles up to 50 ms (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(interval, deadline - now))
        interval = min(interval * 2, 0.05)


def collect_garbage(max_rounds: int = 10) -> int:
    """gc cycles until one collects nothing (at most ``max_rounds``); returns objects freed."""
    total = 0
    for _ in range(max_rounds):
        n = gc.collect()
        total += n
        if n == 0:
            break
    return total


def measure(device: str) -> dict[str, int | None]:
    return {
        "allocated": src.allocated_bytes(device),
        "reserved": src.reserved_bytes(device),
        "device_used": src.device_used_bytes(device),
        "host_rss": src.host_rss(),
    }


@dataclass
class ResetReport:
    device: str
    before: dict[str, int | None]
    after: dict[str, int | None]
    collected_objects: int = 0
    settled: bool = True
    steps: list[str] = field(default_factory=list)

    def freed(self) -> dict[str, int | None]:
        return {k: (None if self.before[k] is None or self.after[k] is None
                    else self.before[k] - self.after[k]) for k in self.before}

    def __str__(self) -> str:
        parts = [f"reset_memory({self.device}):"]
        for k, v in self.freed().items():
            if v is not None:
                parts.append(f"{k} {format_bytes(self.before[k], digits=1)} -> {format_bytes(self.after[k], digits=1)}")
        return " ".join(parts)


def _settle(device: str, timeout: float) -> bool:
    """Wait until the driver's used memory stops changing (two equal reads in a row)."""
    if src.device_type(device) != "cuda" or not src.cuda_available():
        return True
    last = [src.device_used_bytes(device)]

    def stable() -> bool:
        now = src.device_used_bytes(device)
        same = now == last[0]
        last[0] = now
        return same
    return wait_for(stable, timeout=timeout)


def reset_memory(device: Any = None, *, settle_timeout: float = 2.0) -> ResetReport:
    """Release everything that can be released and reset the peak statistics.

    gc until nothing more is collected, synchronize the device, release cached blocks of
    PyTorch's and memwarden's allocators, clear cuBLAS workspaces, give free heap pages
    back to the OS (``malloc_trim``), reset peak stats (memory stats and the host's peak
    RSS), then wait (bounded by ``settle_timeout``) for the driver's free memory to settle.
    """
    device = src.resolve_device(device)
    before = measure(device)
    steps = ["gc"]
    n = collect_garbage()
    src.empty_cache(device)
    steps.append("empty_cache")
    if src.malloc_trim():
        steps.append("malloc_trim")
    src.reset_peak(device)
    if src.reset_host_peak_rss():
        steps.append("reset_peak_rss")
    settled = _settle(device, settle_timeout)
    return ResetReport(device, before, measure(device), n, settled, steps)
