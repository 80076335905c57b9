"""Where the testing toolkit reads memory from: the one place that knows the backends.

Order of preference for a device's *allocated* memory:

1. memwarden's own allocator (``memwarden.alloc``) when importable and installed for the
   device type: exact stats with ``torch.cuda.memory_stats()`` key names and a snapshot;
2. on CUDA, PyTorch's caching allocator (``torch.cuda.memory_stats`` / ``memory_snapshot``);
3. on CPU, a census of live ``torch.Tensor`` storages (exact for tensors reachable from
   Python) -- PyTorch keeps no statistics of its CPU allocations.

Noisy, whole-process sources complete them: the driver's used memory on CUDA
(``torch.cuda.mem_get_info``) and the process RSS on the host (psutil, ``/proc``), read
after ``gc`` and ``malloc_trim`` so freed heap pages are returned first.

Tests (and the lead, when merging the allocator) may swap the allocator backend with
:func:`use_backend`.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from memwarden._devices import memory_device

__all__ = [
    "resolve_device", "device_type", "alloc_backend", "use_backend", "allocator_stats",
    "allocated_bytes", "reserved_bytes", "peak_allocated_bytes", "reset_peak", "empty_cache",
    "snapshot", "live_blocks", "free_and_total", "device_used_bytes", "host_rss",
    "host_peak_rss", "reset_host_peak_rss", "malloc_trim", "tensor_census", "TensorInfo",
    "cuda_available",
]

_backend_override: Any = None
_OVERRIDE_NONE = object()


def _torch():
    import torch
    return torch


def cuda_available() -> bool:
    try:
        return _torch().cuda.is_available()
    except Exception:  # pragma: no cover - broken CUDA install
        return False


def resolve_device(device: Any = None) -> str:
    """"cpu" or "cuda:N": ``None``/"auto" -> the current CUDA device when CUDA is
    available, else "cpu"; anything :func:`memwarden._devices.device_key` reads ("cuda",
    "cuda:N", an index, a torch.device) -> "cuda:N"; "mps" and "disk" are refused."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        device = "cuda" if cuda_available() else "cpu"
    return memory_device(device, "'cpu', 'cuda' or 'cuda:N' (or None/'auto')",
                         "the testing toolkit measures no {key!r} memory")


def device_type(device: str) -> str:
    return device.split(":", 1)[0]


@contextlib.contextmanager
def use_backend(backend: Any) -> Iterator[Any]:
    """Use ``backend`` (an object with memwarden.alloc's functions) in place of
    ``memwarden.alloc``; ``None`` forces "no allocator backend"."""
    global _backend_override
    prev = _backend_override
    _backend_override = _OVERRIDE_NONE if backend is None else backend
    try:
        yield backend
    finally:
        _backend_override = prev


def alloc_backend(device: str) -> Any:
    """memwarden's allocator module if it is installed for ``device``'s type, else None."""
    if _backend_override is _OVERRIDE_NONE:
        return None
    mod = _backend_override
    if mod is None:
        mod = sys.modules.get("memwarden.alloc")
        if mod is None:
            try:
                import memwarden.alloc as mod  # type: ignore[no-redef]
            except Exception:
                return None
    try:
        return mod if mod.is_installed(device_type(device)) else None
    except Exception:
        return None


def allocator_stats(device: str) -> dict | None:
    """Stats with torch.cuda.memory_stats() key names, or None where no allocator keeps them."""
    be = alloc_backend(device)
    if be is not None:
        return dict(be.memory_stats(device))
    if device_type(device) == "cuda" and cuda_available():
        return dict(_torch().cuda.memory_stats(device))
    return None


def _stat(device: str, key: str) -> int | None:
    st = allocator_stats(device)
    if st is None:
        return None
    v = st.get(key)
    return int(v) if v is not None else None


def allocated_bytes(device: str) -> int | None:
    return _stat(device, "allocated_bytes.all.current")


def reserved_bytes(device: str) -> int | None:
    return _stat(device, "reserved_bytes.all.current")


def peak_allocated_bytes(device: str) -> int | None:
    return _stat(device, "allocated_bytes.all.peak")


def reset_peak(device: str) -> None:
    be = alloc_backend(device)
    if be is not None:
        be.reset_peak_memory_stats(device)
    if device_type(device) == "cuda" and cuda_available():
        _torch().cuda.reset_peak_memory_stats(device)


def empty_cache(device: str) -> None:
    be = alloc_backend(device)
    if be is not None:
        try:
            be.empty_cache(device)
        except Exception:
            pass
    if device_type(device) == "cuda" and cuda_available():
        torch = _torch()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        with contextlib.suppress(Exception):
            torch._C._cuda_clearCublasWorkspaces()
        with contextlib.suppress(Exception):
            torch.cuda.ipc_collect()


def snapshot(device: str) -> dict | None:
    be = alloc_backend(device)
    if be is not None:
        return be.snapshot(device)
    if device_type(device) == "cuda" and cuda_available():
        torch = _torch()
        idx = int(device.split(":")[1])
        snap = torch.cuda.memory_snapshot()
        return {"segments": [s for s in snap if s.get("device", idx) == idx]}
    return None


@dataclass
class Block:
    address: int
    size: int
    requested_size: int
    frames: list

    def where(self, limit: int = 3) -> str:
        out = []
        for fr in self.frames[:limit]:
            if isinstance(fr, dict):
                out.append(f"{fr.get('filename', '?')}:{fr.get('line', '?')} in {fr.get('name', '?')}")
            else:
                out.append(str(fr))
        return " <- ".join(out)


def live_blocks(device: str) -> dict[int, Block] | None:
    """Active blocks of the allocator snapshot keyed by address (None without a snapshot)."""
    try:
        snap = snapshot(device)
    except Exception:
        return None
    if snap is None:
        return None
    segs = snap.get("segments", snap) if isinstance(snap, dict) else snap
    out: dict[int, Block] = {}
    for seg in segs:
        for b in seg.get("blocks", []):
            if b.get("state") == "active_allocated":
                out[int(b["address"])] = Block(int(b["address"]), int(b.get("size", 0)),
                                               int(b.get("requested_size", b.get("size", 0))),
                                               list(b.get("frames") or []))
    return out


def free_and_total(device: str) -> tuple[int, int]:
    """Free and total memory of the device: the driver's on CUDA (memwarden's limit when
    its allocator has one), available/total host memory on CPU."""
    if device_type(device) == "cuda":
        if not cuda_available():
            return 0, 0
        free, total = _torch().cuda.mem_get_info(device)
        return int(free), int(total)
    import psutil
    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def device_used_bytes(device: str) -> int | None:
    """Driver-level used memory on a CUDA device (all processes), None on CPU."""
    if device_type(device) != "cuda" or not cuda_available():
        return None
    free, total = free_and_total(device)
    return total - free


def host_rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil
        return int(psutil.Process().memory_info().rss)


def host_peak_rss() -> int | None:
    """Peak RSS since start or the last :func:`reset_host_peak_rss` (Linux VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_host_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_libc = None
_libc_lock = threading.Lock()


def malloc_trim() -> bool:
    """Give free heap pages back to the OS (glibc); False where unavailable."""
    global _libc
    with _libc_lock:
        if _libc is None:
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                _libc = False
    if not _libc:
        return False
    try:
        _libc.malloc_trim(0)
        return True
    except AttributeError:
        return False


@dataclass
class TensorInfo:
    key: int          # storage data pointer
    nbytes: int
    desc: str
    ref: Any          # weak reference to one tensor using the storage (None if not weakref-able)


def tensor_census(device: str = "cpu") -> dict[int, TensorInfo]:
    """Live torch storages on ``device``'s type reachable from Python tensors, by data pointer.

    Exact for tensors that Python objects hold (module globals, lists, closures,
    fixtures); storages held only from C++ (autograd's saved tensors) are not seen.
    """
    import weakref
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    want = device_type(device)
    out: dict[int, TensorInfo] = {}
    tensor_cls = torch.Tensor
    is_tensor: dict[type, bool] = {}
    for obj in gc.get_objects():
        # type() rather than isinstance(): no __class__ lookups on lazy/deprecated objects
        t = type(obj)
        ok = is_tensor.get(t)
        if ok is None:
            ok = is_tensor[t] = issubclass(t, tensor_cls)
        if not ok:
            continue
        try:
            if obj.device.type != want or obj.is_meta or obj.layout != torch.strided:
                continue
            st = obj.untyped_storage()
            ptr = st.data_ptr()
            if ptr == 0 or ptr in out:
                continue
            nbytes = st.nbytes()
            desc = f"{str(obj.dtype).replace('torch.', '')}{list(obj.shape)} on {obj.device}"
        except Exception:
            continue
        try:
            ref = weakref.ref(obj)
        except TypeError:
            ref = None
        out[ptr] = TensorInfo(ptr, nbytes, desc, ref)
    return out
