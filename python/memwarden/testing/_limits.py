"""PeakMonitor: the peak memory of a piece of code above its starting point, and where."""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from . import _sources as src
from memwarden._units import format_bytes

__all__ = ["PeakMonitor", "PeakResult"]

_SKIP_DIRS = (os.path.dirname(__file__), os.path.dirname(threading.__file__))
SITE_SLACK = 2**20  # growth below this after the peak's site does not move the site


@dataclass
class PeakResult:
    device: str
    source: str            # "memwarden-alloc" | "torch-alloc" | "host-rss"
    baseline: int
    peak: int              # bytes above the baseline
    exact: bool            # from a peak counter (allocator stats, VmHWM) rather than sampling
    where: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, function)

    def format_where(self, limit: int = 4) -> str:
        return "\n".join(f"    {f}:{ln} in {fn}" for f, ln, fn in self.where[:limit])

    def describe(self, limit_bytes: int | None = None) -> str:
        s = f"peak {format_bytes(self.peak, digits=1)} above the start on {self.device} (source: {self.source})"
        if self.exact and self.source != "host-rss":   # an allocator's counter: bytes, not pages
            s += f" = {self.peak} bytes"
        if limit_bytes is not None:
            s += f", limit {format_bytes(limit_bytes, digits=1)}"
        if self.where:
            s += "\n  the largest sampled value was reached at (innermost last):\n" + self.format_where()
        return s


class PeakMonitor:
    """Measure peak memory between :meth:`start` and :meth:`stop`.

    The peak comes from the allocator's ``allocated_bytes.all.peak`` (memwarden's
    allocator, PyTorch's on CUDA) or, on the host, the kernel's peak RSS (VmHWM, reset at
    start). A sampler thread watches the same quantity every ``interval`` seconds and
    remembers the stack of ``thread`` when it saw a new maximum: that is "where".
    """

    def __init__(self, device: Any = None, interval: float = 0.002, thread: threading.Thread | None = None):
        self.device = src.resolve_device(device)
        self.interval = interval
        self._tid = (thread or threading.current_thread()).ident
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._alloc = src.allocator_stats(self.device) is not None
        self.source = ("memwarden-alloc" if src.alloc_backend(self.device) is not None else "torch-alloc") \
            if self._alloc else "host-rss"
        self._max = 0
        self._where: list = []

    def _current(self) -> int:
        if self._alloc:
            return int(src.allocated_bytes(self.device) or 0)
        return src.host_rss()

    def _stack(self) -> list[tuple[str, int, str]]:
        frame = sys._current_frames().get(self._tid)
        out = []
        while frame is not None and len(out) < 40:
            co = frame.f_code
            if not co.co_filename.startswith(_SKIP_DIRS):
                out.append((co.co_filename, frame.f_lineno, co.co_name))
            frame = frame.f_back
        out.reverse()
        # keep the innermost frames, dropping pytest/pluggy machinery
        keep = [f for f in out if "/_pytest/" not in f[0] and "/pluggy/" not in f[0]]
        return keep[-6:]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            v = self._current()
            if v > self._max:
                # the site is where the peak was reached, not where a few more pages were
                # touched afterwards (host RSS creeps while Python runs the next lines)
                if not self._where or v - self._max > SITE_SLACK:
                    self._where = self._stack()
                self._max = v

    def start(self) -> "PeakMonitor":
        if self._alloc:
            src.reset_peak(self.device)
        else:
            src.malloc_trim()
            self._have_hwm = src.reset_host_peak_rss()
        self.baseline = self._current()
        self._max = self.baseline
        self._thread = threading.Thread(target=self._run, name="memwarden-peak", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> PeakResult:
        v = self._current()
        if v > self._max:
            self._max, self._where = v, self._stack()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        exact = False
        peak = self._max
        if self._alloc:
            p = src.peak_allocated_bytes(self.device)
            if p is not None:
                peak, exact = max(peak, int(p)), True
        elif getattr(self, "_have_hwm", False):
            p = src.host_peak_rss()
            if p is not None:
                peak, exact = max(peak, p), True
        return PeakResult(self.device, self.source, self.baseline, max(0, peak - self.baseline), exact,
                          self._where)
