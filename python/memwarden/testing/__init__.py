"""memwarden.testing: memory reset, leak checks, limits, tracking and process isolation.

The pytest plugin lives in :mod:`memwarden.testing.plugin` (loaded through the
``pytest11`` entry point); this package holds the pieces it is built from, usable on
their own. Importing it does not import torch, matplotlib or pytest: torch
and memwarden's allocator (with the extension) are imported when a measurement first
needs them.
"""
from ._isolation import IsolatedProcessError, run_isolated
from ._leak import LeakChecker, LeakResult, MemoryLeakError
from ._limits import PeakMonitor, PeakResult
from ._reset import ResetReport, reset_memory, wait_for
from ._resources import GpuResources, InsufficientMemory, Reservation
from ._tracker import Analysis, MemoryTracker, Sample, Trend
from memwarden._units import format_bytes, parse_bytes

__all__ = [
    "reset_memory", "ResetReport", "wait_for",
    "LeakChecker", "LeakResult", "MemoryLeakError",
    "PeakMonitor", "PeakResult",
    "MemoryTracker", "Sample", "Analysis", "Trend",
    "run_isolated", "IsolatedProcessError",
    "GpuResources", "Reservation", "InsufficientMemory",
    "parse_bytes", "format_bytes",
]
