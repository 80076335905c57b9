"""``ModelWeightCache``: an LRU of module weights (a whole model's state, one decoder
layer's, an expert group's) kept in host memory within a byte budget, so swapping a model
back in is a copy, not a load from disk.

Entries are state dicts copied to the host (pinned when CUDA is present, so a restore to a
GPU can be asynchronous). With ``compress=True`` every floating-point weight matrix is
stored as INT8 with one float32 scale per output row (memwarden's quantize kernel,
"token" granularity over ``[out_features, in_features]``: per output channel), about half
the bytes of bf16, dequantized on restore; the largest relative error seen is reported.
Vectors (norms, biases) and non-float tensors are kept as they are. Putting an entry evicts
least recently used ones until it fits; one larger than the whole budget is refused.
Counters: hits, misses, evictions, bytes in and out.

May import: torch (lazily), :mod:`memwarden.quant` and the bottom layers.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Optional

from memwarden._units import format_bytes, parse_bytes

__all__ = ["ModelWeightCache", "WeightCacheStats"]


@dataclass
class _Entry:
    tensors: dict            # name -> host tensor, or (q, scale, dtype) for a compressed matrix
    nbytes: int              # host bytes held
    original_bytes: int      # bytes of the weights as given


@dataclass(frozen=True)
class WeightCacheStats:
    entries: int
    bytes_cached: int
    budget_bytes: int
    hits: int
    misses: int
    evictions: int
    bytes_in: int            # bytes of weights put in (as given)
    bytes_out: int           # bytes of weights restored (as returned)
    compression_error: float  # largest max|w - restored| / max|w| seen (0 uncompressed)
    keys: tuple = field(default=())  # least recently used first

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


def _state_of(weights) -> Mapping[str, Any]:
    return weights.state_dict() if hasattr(weights, "state_dict") else weights


class ModelWeightCache:
    """``put(key, module_or_state_dict)``, ``get(key) -> state dict | None``,
    ``load_into(key, module) -> bool``; ``budget`` in bytes or a string ("8GiB")."""

    def __init__(self, budget, *, compress: bool = False, pin_memory: Optional[bool] = None):
        self.budget_bytes = parse_bytes(budget, "budget")
        if self.budget_bytes <= 0:
            raise ValueError(f"ModelWeightCache: budget must be positive, got {budget!r}")
        if not isinstance(compress, bool):
            raise TypeError(f"ModelWeightCache: compress must be a bool, got {type(compress).__name__}")
        self.compress = compress
        self._pin = pin_memory
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._bytes_in = self._bytes_out = 0
        self._error = 0.0

    # -- storing ------------------------------------------------------------------------

    def _host_copy(self, t):
        import torch

        pin = torch.cuda.is_available() if self._pin is None else self._pin
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
        host.copy_(t.detach())
        return host

    def _store(self, t):
        """(stored form, host bytes, relative error) of one tensor."""
        import torch

        if self.compress and t.is_floating_point() and t.dim() == 2 and t.numel():
            from memwarden.quant import dequantize_int8, quantize_int8

            w = t.detach().to("cpu").contiguous()
            if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                w = w.float()
            q, scale, _ = quantize_int8(w, "token")
            back = dequantize_int8(q, scale, out_dtype=torch.float32)
            absmax = w.float().abs().max().clamp(min=1e-30)
            error = float((back - w.float()).abs().max() / absmax)
            q, scale = self._host_copy(q), self._host_copy(scale)
            return (q, scale, t.dtype), q.nbytes + scale.nbytes, error
        host = self._host_copy(t)
        return host, host.nbytes, 0.0

    def put(self, key: Hashable, weights) -> int:
        """Cache a copy of ``weights`` (a module or a state dict) under ``key``, replacing
        an entry of that key; returns the host bytes it takes. Evicts least recently used
        entries until it fits; ``ValueError`` when it is larger than the budget."""
        state = _state_of(weights)
        stored, nbytes, original, error = {}, 0, 0, 0.0
        for name, t in state.items():
            stored[name], held, e = self._store(t)
            nbytes += held
            original += t.numel() * t.element_size()
            error = max(error, e)
        if nbytes > self.budget_bytes:
            raise ValueError(f"ModelWeightCache.put: {key!r} needs {format_bytes(nbytes)}, more than the whole budget "
                             f"of {format_bytes(self.budget_bytes)}")
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key).nbytes
            while self._bytes + nbytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evictions += 1
            self._entries[key] = _Entry(stored, nbytes, original)
            self._bytes += nbytes
            self._bytes_in += original
            self._error = max(self._error, error)
        return nbytes

    # -- restoring ----------------------------------------------------------------------

    def get(self, key: Hashable, device=None) -> Optional[dict]:
        """The cached state dict (new tensors on ``device``, default the host; compressed
        matrices dequantized to their dtype), or None when ``key`` is not cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
        state = {name: self._restore(value, device) for name, value in entry.tensors.items()}
        with self._lock:
            self._bytes_out += entry.original_bytes
        return state

    @staticmethod
    def _restore(value, device):
        if isinstance(value, tuple):
            import torch

            from memwarden.quant import dequantize_int8

            q, scale, dtype = value
            kernel_dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
            out = dequantize_int8(q, scale, out_dtype=kernel_dtype).to(dtype)
            return out if device is None else out.to(device, non_blocking=True)
        return value.clone() if device is None else value.to(device, non_blocking=True, copy=True)

    def load_into(self, key: Hashable, module, strict: bool = True) -> bool:
        """Load the cached weights of ``key`` into ``module`` (on its parameters' devices);
        False when ``key`` is not cached."""
        state = self.get(key)
        if state is None:
            return False
        module.load_state_dict(state, strict=strict)
        return True

    def discard(self, key: Hashable) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._bytes -= entry.nbytes
            return True

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> WeightCacheStats:
        with self._lock:
            return WeightCacheStats(len(self._entries), self._bytes, self.budget_bytes, self._hits, self._misses,
                                    self._evictions, self._bytes_in, self._bytes_out, self._error,
                                    tuple(self._entries))
