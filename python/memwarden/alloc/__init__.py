"""memwarden's caching allocator, for host (CPU) tensors and, when built with CUDA, GPUs.

The C++ core (``csrc/core/alloc``) keeps small (<= 1 MiB) and large pools, splits and
coalesces blocks, enforces an optional memory limit and runs an out-of-memory chain (free
the cache and retry, then call :func:`on_oom` callbacks and retry, then raise). Statistics
use the key names of ``torch.cuda.memory_stats()``.

Host::

    import memwarden.alloc as ma
    ma.install("cpu")                 # every CPU tensor allocated from now on is pooled
    ma.set_memory_limit("cpu", "2 GiB")
    x = torch.empty(1000, 1000)
    ma.memory_stats("cpu")["allocated_bytes.all.current"]
    print(ma.memory_summary("cpu"))
    ma.uninstall("cpu")

or scoped: ``with ma.use("cpu", memory_limit="2 GiB"): ...``.

History and PyTorch's viewer: with ``record_history("cpu")`` on, the core keeps a ring of the
allocator's actions; ``dump_snapshot("snap.pickle")`` writes what
``torch.cuda.memory._dump_snapshot`` writes (``snapshot(format="torch")``), which
``torch.cuda._memory_viz`` renders. ``plot_segments()`` and ``plot_history()`` draw
matplotlib figures; ``summary()`` displays as a table in notebooks.

CUDA: ``install("cuda")`` swaps PyTorch's CUDA allocator for memwarden's through
``torch.cuda.memory.CUDAPluggableAllocator`` (before the first CUDA allocation; PyTorch
cannot switch back), and ``use("cuda")`` routes the allocations of a block of code to a
``torch.cuda.MemPool`` backed by memwarden's allocator.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import threading
from typing import Any, Callable, Iterator

import torch

from memwarden import _native
from memwarden._devices import memory_device
from memwarden._units import parse_bytes
from memwarden.alloc import _viz

__all__ = [
    "install", "uninstall", "is_installed", "use", "pool", "memory_stats", "memory_allocated",
    "memory_reserved", "max_memory_allocated", "max_memory_reserved", "reset_peak_memory_stats",
    "reset_accumulated_memory_stats", "snapshot", "dump_snapshot", "empty_cache", "set_memory_limit",
    "get_memory_limit", "set_gc_threshold", "configure", "on_oom", "OomCallbackHandle",
    "record_history", "memory_summary", "summary", "MemorySummary", "plot_segments", "plot_history",
    "cuda_built",
]

MemorySummary = _viz.MemorySummary

_C = _native.load()
_core = _C.alloc
_lock = threading.RLock()
_cuda_state: dict[str, Any] = {"pluggable": None, "global": False, "pools": 0}
_history: dict[str, tuple[bool, bool]] = {}  # device -> (enabled, acquire_gil) as last set by record_history


def cuda_built() -> bool:
    """Whether the extension was compiled with the CUDA backend."""
    return bool(_core.cuda_built())


def _device(device: Any = "cpu") -> str:
    """'cpu' or 'cuda:N' (the core's names) from anything :func:`memwarden._devices.device_key`
    reads. A bare 'cuda' is the current device, read without initialising CUDA (which
    would bring up PyTorch's allocator, and install('cuda') must come before it)."""
    return memory_device(device, "'cpu' or 'cuda[:N]' (or a GPU index)",
                         "memwarden's allocator has no {key!r} backend")


def _require_cuda(device: str) -> None:
    if not cuda_built():
        raise RuntimeError(f"memwarden was built without CUDA: no allocator for {device!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"CUDA is not available: no allocator for {device!r}")


# ---- installation -------------------------------------------------------------------------

def _pluggable():
    if _cuda_state["pluggable"] is None:
        from torch.cuda.memory import CUDAPluggableAllocator
        _cuda_state["pluggable"] = CUDAPluggableAllocator(_C.__file__, "memwarden_cuda_malloc",
                                                          "memwarden_cuda_free")
    return _cuda_state["pluggable"]


def install(device: Any = "cpu") -> bool:
    """Make memwarden's allocator serve ``device``'s tensors; returns False if it already did.

    ``"cpu"``: replaces PyTorch's CPU allocator (reversible with :func:`uninstall`);
    tensors allocated before keep their own deleter and are freed correctly.
    ``"cuda"``: ``torch.cuda.memory.change_current_allocator`` with memwarden's pluggable
    allocator; must happen before the first CUDA allocation and cannot be undone.
    """
    dev = _device(device)
    with _lock:
        if dev == "cpu":
            return bool(_core.install_host())
        _require_cuda(dev)
        if _cuda_state["global"]:
            return False
        torch.cuda.memory.change_current_allocator(_pluggable())
        _cuda_state["global"] = True
        return True


def uninstall(device: Any = "cpu") -> bool:
    """Put PyTorch's own allocator back; False if memwarden's was not installed.

    Memory still held by tensors allocated meanwhile is returned to memwarden's pool when
    they are freed; call :func:`empty_cache` afterwards to give the cached segments back.
    """
    dev = _device(device)
    with _lock:
        if dev == "cpu":
            return bool(_core.uninstall_host())
        if _cuda_state["global"]:
            raise RuntimeError("PyTorch cannot switch its CUDA allocator back once it was changed; "
                               "use memwarden.alloc.use('cuda') for scoped use instead")
        return False


def is_installed(device: Any = "cpu") -> bool:
    """Whether tensors of ``device`` currently come from memwarden's allocator."""
    dev = _device(device)
    if dev == "cpu":
        return bool(_core.host_installed())
    return bool(_cuda_state["global"] or _cuda_state["pools"] > 0)


@contextlib.contextmanager
def use(device: Any = "cpu", *, memory_limit: int | str | None = None,
        record: bool = False) -> Iterator[str]:
    """Scoped use: memwarden's allocator serves ``device`` inside the ``with`` block.

    On the CPU it installs the host allocator (unless it already was) and uninstalls it on
    exit; on CUDA it allocates into a ``torch.cuda.MemPool`` backed by memwarden's
    allocator (``torch.cuda.use_mem_pool``). ``memory_limit`` applies inside the block and
    the previous limit comes back on exit; ``record`` records allocation stacks.
    """
    dev = _device(device)
    if dev != "cpu":
        _require_cuda(dev)
    prev_limit = get_memory_limit(dev)
    with contextlib.ExitStack() as stack:
        if memory_limit is not None:
            set_memory_limit(dev, memory_limit)
            stack.callback(set_memory_limit, dev, prev_limit)
        if record and not _history.get(dev, (False, False))[0]:  # already recording: leave it as set
            record_history(dev, True)
            stack.callback(record_history, dev, False)
        if dev == "cpu":
            if install(dev):
                stack.callback(uninstall, dev)
            yield dev
        else:
            mem_pool = torch.cuda.MemPool(_pluggable().allocator())
            with _lock:
                _cuda_state["pools"] += 1
            try:
                with torch.cuda.use_mem_pool(mem_pool, device=torch.device(dev)):
                    yield dev
            finally:
                with _lock:
                    _cuda_state["pools"] -= 1


pool = use  # alias: ``with memwarden.alloc.pool("cuda"): ...``


# ---- statistics and snapshots -------------------------------------------------------------

def memory_stats(device: Any = "cpu") -> dict[str, int]:
    """Counters with the key names of ``torch.cuda.memory_stats()`` (sorted by key)."""
    return dict(sorted(_core.stats(_device(device)).items()))


def memory_allocated(device: Any = "cpu") -> int:
    return int(_core.stats(_device(device))["allocated_bytes.all.current"])


def max_memory_allocated(device: Any = "cpu") -> int:
    return int(_core.stats(_device(device))["allocated_bytes.all.peak"])


def memory_reserved(device: Any = "cpu") -> int:
    return int(_core.stats(_device(device))["reserved_bytes.all.current"])


def max_memory_reserved(device: Any = "cpu") -> int:
    return int(_core.stats(_device(device))["reserved_bytes.all.peak"])


def reset_peak_memory_stats(device: Any = "cpu") -> None:
    _core.reset_peak_stats(_device(device))


def reset_accumulated_memory_stats(device: Any = "cpu") -> None:
    _core.reset_accumulated_stats(_device(device))


def snapshot(device: Any = "cpu", format: str = "memwarden") -> dict:
    """The allocator's segments and blocks, as a plain dict.

    ``format="memwarden"``: ``{"segments": [...], "fragmentation": f, "free_bytes": n,
    "largest_free_block": n}``. Each segment has device (-1 for the host), address,
    total_size, allocated_size, active_size, requested_size, stream, segment_type
    ("small"/"large"), segment_pool_id, is_expandable, frames and blocks; each block has
    address, size, requested_size, state ("active_allocated", "active_pending_free",
    "inactive") and frames (the allocating Python stack when :func:`record_history` is on).
    fragmentation = 1 - largest free block / free bytes.

    ``format="torch"``: what ``torch.cuda.memory._snapshot()`` returns, ``{"segments": [...],
    "device_traces": [[...], ...]}``, taken at one instant: the same segments, with device
    the index of the trace list that belongs to them (0 for the host, N for cuda:N), and the
    recorded trace entries (action, addr, size, stream, time_us, frames; an "oom" has
    device_free instead of addr), oldest first. ``torch.cuda._memory_viz`` reads it.
    """
    dev = _device(device)
    if format == "memwarden":
        return _core.snapshot(dev)
    if format != "torch":
        raise ValueError(f"format must be 'memwarden' or 'torch', got {format!r}")
    snap = _core.snapshot(dev, include_trace=True)
    index = _trace_index(dev)
    for segment in snap["segments"]:
        segment["device"] = index
    return {"segments": snap["segments"], "device_traces": [[] for _ in range(index)] + [snap["trace"]]}


def _trace_index(device: str) -> int:
    """Where ``device``'s trace goes in device_traces: torch's viewer offers the devices
    0..len(device_traces)-1, so the host is 0 there (-1 in memwarden's own format)."""
    return 0 if device == "cpu" else int(device.split(":")[1])


def dump_snapshot(path: str = "dump_snapshot.pickle", device: Any = "cpu") -> None:
    """Pickle :func:`snapshot` ``(device, format="torch")`` to ``path``, as
    ``torch.cuda.memory._dump_snapshot`` does; ``torch.cuda._memory_viz`` (``segment_plot``,
    ``trace_plot``, ``segsum``, ``trace``) and pytorch.org/memory_viz read the file."""
    data = snapshot(device, format="torch")
    with open(path, "wb") as f:
        pickle.dump(data, f)


def empty_cache(device: Any = "cpu") -> None:
    """Give every cached, wholly free segment back to the system (or the GPU)."""
    _core.empty_cache(_device(device))


def set_memory_limit(device: Any, nbytes: int | float | str | None) -> None:
    """Cap the bytes memwarden reserves for ``device`` (``None`` or 0: no limit).

    Accepts byte counts and strings such as ``"16 GiB"``; a limit below what is reserved
    gives cached segments back first. Allocations beyond it run the OOM chain.
    """
    n = 0 if nbytes is None else parse_bytes(nbytes, "nbytes")
    _core.set_memory_limit(_device(device), n)


def get_memory_limit(device: Any = "cpu") -> int | None:
    n = int(_core.memory_limit(_device(device)))
    return n or None


def set_gc_threshold(device: Any, fraction: float) -> None:
    """Free cached segments before reserving beyond ``fraction`` of the memory limit (0: off)."""
    _core.set_gc_threshold(_device(device), float(fraction))


def configure(device: Any = "cpu", *, max_split_size: int | str | None = None,
              roundup_power2_divisions: int = 0, gc_threshold: float = 0.0) -> None:
    """Rounding and splitting options (like PYTORCH_CUDA_ALLOC_CONF), while nothing is reserved."""
    mss = 0 if max_split_size is None else parse_bytes(max_split_size, "max_split_size")
    _core.configure(_device(device), mss, int(roundup_power2_divisions), float(gc_threshold))


# ---- out-of-memory callbacks and history ---------------------------------------------------

class OomCallbackHandle:
    """Returned by :func:`on_oom`; ``remove()`` unregisters the callback (also a context manager)."""

    def __init__(self, device: str, ident: int, callback: Callable[[int], Any]):
        self.device, self.id, self.callback = device, ident, callback

    def remove(self) -> bool:
        return bool(_core.remove_oom_callback(self.device, self.id))

    def __enter__(self) -> "OomCallbackHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def on_oom(callback: Callable[[int], Any], device: Any = "cpu") -> OomCallbackHandle:
    """Register ``callback(nbytes)`` for when an allocation fails even after the cache was freed.

    Callbacks run in registration order, each followed by a retry; one that returns False
    says it freed nothing (no retry), True or None lets the allocation be retried. Use them
    to give application memory back (KV pages, weights to offload). Exceptions raised in a
    callback are reported as unraisable and count as False.
    """
    if not callable(callback):
        raise TypeError(f"callback must be callable, got {callback!r}")
    dev = _device(device)
    return OomCallbackHandle(dev, int(_core.add_oom_callback(dev, callback)), callback)


def record_history(device: Any = "cpu", enabled: bool = True, *, acquire_gil: bool = False,
                   max_entries: int = sys.maxsize, clear_history: bool = False) -> None:
    """Record the allocating Python stack of each live block (see :func:`snapshot` frames)
    and a trace of the allocator's actions, as ``torch.cuda.memory._record_memory_history``.

    The trace keeps the newest ``max_entries`` entries (torch's default: no bound): alloc,
    free_requested, free_completed, segment_alloc, segment_free and oom, each with addr,
    size, stream, time_us and the allocating stack; ``snapshot(format="torch")`` and
    :func:`dump_snapshot` export it. Turning recording off keeps the trace (unlike torch,
    so a ``use(record=True)`` block can be dumped after it); ``clear_history`` drops it.

    By default the stack is taken only when the allocating thread holds the GIL (never
    blocks). PyTorch's ops release the GIL before allocating, so to see the stacks of
    tensor allocations pass ``acquire_gil=True``: the allocating Python thread takes the GIL
    back for the capture, as PyTorch's own CUDA allocator does (threads without a Python
    thread state are never captured).
    """
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
    dev = _device(device)
    _core.record_history(dev, bool(enabled), bool(acquire_gil), max_entries, bool(clear_history))
    _history[dev] = (bool(enabled), bool(acquire_gil))


# ---- summary and plots --------------------------------------------------------------------

def summary(device: Any = "cpu", abbreviated: bool = False) -> MemorySummary:
    """The statistics table of :func:`memory_summary` as an object: ``str()`` is the text,
    and a notebook shows it as HTML followed by one row per segment."""
    dev = _device(device)
    return MemorySummary(dev, memory_stats(dev), snapshot(dev), is_installed(dev), abbreviated)


def memory_summary(device: Any = "cpu", abbreviated: bool = False) -> str:
    """A readable table of :func:`memory_stats`, in the style of ``torch.cuda.memory_summary()``."""
    return str(summary(device, abbreviated))


def plot_segments(device: Any = "cpu"):
    """A matplotlib Figure mapping fragmentation: one row per segment, each block a bar at
    its offset coloured by state (allocated, awaiting other streams, free), and the
    fragmentation of :func:`snapshot` in the title. Needs matplotlib (the ``plot`` extra)."""
    dev = _device(device)
    return _viz.segments_figure(snapshot(dev), dev)


def plot_history(device: Any = "cpu"):
    """A matplotlib Figure of the bytes allocated (as requested) and reserved after each
    entry of the trace :func:`record_history` recorded, ending at the current state;
    out-of-memory errors as red lines. Needs matplotlib (the ``plot`` extra)."""
    dev = _device(device)
    return _viz.history_figure(snapshot(dev, format="torch"), _trace_index(dev), dev)
