"""Shared timing helpers for the benchmarks: medians of repeated runs, one process."""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], device: str = "cpu", repeats: int = 7, inner: int | None = None,
                   min_time: float = 0.02) -> float:
    """Median over `repeats` of the mean time of `inner` back-to-back calls (auto-sized)."""
    fn()  # warm up (allocations, lazy init)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if inner is None:
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        inner = max(1, int(min_time / max(time.perf_counter() - start, 1e-7)))
    samples = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / inner)
        else:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def new_figure(figsize):
    """A matplotlib Figure (Agg, no display), or None with a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return Figure(figsize=figsize)


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
