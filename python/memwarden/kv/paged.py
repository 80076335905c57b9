"""A KV cache in pages that stays inside a memory budget (:class:`PagedKVCache`).

Tokens live in pages of ``page_size`` tokens, shared by every layer (page ``j`` of every
layer holds the same positions) and by every sequence of the batch (each sequence has
its own physical pages, the structure is common). Pages are written and read with the
paged ops of :mod:`memwarden.kv.ops` (``reshape_and_cache_flash`` and ``gather_cache``),
so an INT8 page is dequantized inside the gather.

Storage is a *tier*: one tensor per tier of ``slots`` full-precision pages for every
layer, K and V (``[layers, 2, slots, kv_heads, page_size, head_dim]``: head-major pages,
the ops' HND layout, so attention streams a head's rows), viewed a second
way as INT8 pages: a slot of a 2-byte dtype holds two INT8 pages (four for float32), and
a small float32 tensor holds their per-(token, head) scales. Tiers: the device (budget
``max_memory``, preallocated), host memory (``offload="host"``; pinned on CUDA) and a
memory-mapped file on disk (``offload="host+disk"``, past ``host_memory``).

Policy, when a new page would take the device past ``threshold`` of its slots:

1. compress the least recently used full-precision pages to INT8 (per token and head,
   ``absmax / 127``), never the ``residual_length`` most recent tokens (KIVI);
2. if that is not enough, move the least recently used pages to host memory, then to
   disk, or drop them (``offload="evict"``), as configured.

An offloaded page is read where it lies (a copy to the device inside :meth:`get`). A
dropped page is never lost silently: reading it raises :class:`KVEvictedError`, unless
``missing="skip"``, in which case :meth:`get` returns the live tokens only and
:attr:`positions` says which they are. ``compress="always"`` (or ``kv_dtype="int8"``)
stores every page as INT8 from the start, except the residual window.

Pruning frees memory on the caller's say: :meth:`remove_tokens` (any scorer),
:meth:`prune_streaming` (StreamingLLM: ``sinks`` first tokens + a recent ``window``) and
:meth:`prune_scores` (H2O: keep the tokens with the highest accumulated attention).

May import: torch, :mod:`memwarden.kv.ops` and the bottom layers. Never transformers
(that is :mod:`memwarden.kv.cache`).
"""
from __future__ import annotations

import collections
import math
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from memwarden._checks import integer
from memwarden._devices import torch_device
from memwarden._table import html_table
from memwarden._units import format_bytes, parse_bytes
from memwarden.kv import ops

__all__ = ["KVCacheStats", "KVEvictedError", "PagedKVCache", "KV_DTYPES", "OFFLOAD_MODES", "COMPRESS_MODES",
           "merge_attention"]

KV_DTYPES = ("auto", "int8", "int8_per_token_head")
COMPRESS_MODES = ("pressure", "always", "never")
OFFLOAD_MODES = ("never", "host", "host+disk", "evict")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEVICE, _HOST, _DISK = 0, 1, 2
_TIER_NAMES = ("device", "host", "disk")


class KVEvictedError(LookupError):
    """A read asked for tokens whose page the memory policy dropped (``offload="evict"``)."""


@dataclass
class KVCacheStats:
    """What :meth:`PagedKVCache.stats` reports. Pages count logical pages (one per
    ``page_size`` tokens, all layers and sequences together); bytes are the storage
    they take (all layers, K and V, INT8 scales included)."""

    tokens: int
    pages_resident: int      # full precision, on the device
    pages_compressed: int    # INT8, on the device
    pages_offloaded: int     # on host memory or disk
    pages_evicted: int       # dropped by the policy (cumulative)
    bytes_by_state: dict = field(default_factory=dict)
    budget_bytes: Optional[int] = None
    budget_used: Optional[float] = None      # fraction of the device budget's slots in use
    offloaded_reads: int = 0                 # page reads served from host or disk
    reads: int = 0                           # page reads in all
    compression_error: float = 0.0           # max |x - dequant(quant(x))| / absmax seen
    tokens_removed: int = 0                  # by remove_tokens / pruning

    @property
    def offload_hit_rate(self) -> float:
        """The fraction of page reads that had to come from host memory or disk."""
        return self.offloaded_reads / self.reads if self.reads else 0.0

    def __str__(self) -> str:
        states = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.bytes_by_state.items())
        budget = "no budget" if self.budget_bytes is None else (
            f"budget {format_bytes(self.budget_bytes)} ({self.budget_used:.0%} used)")
        pages = (f"{self.tokens} tokens: {self.pages_resident} pages resident, {self.pages_compressed} compressed, "
                 f"{self.pages_offloaded} offloaded, {self.pages_evicted} evicted")
        return "; ".join(part for part in (pages, states, budget) if part)  # no bytes before the first page

    def _repr_html_(self) -> str:
        rows = [["resident (full precision)", self.pages_resident], ["compressed (INT8)", self.pages_compressed],
                ["offloaded", self.pages_offloaded], ["evicted", self.pages_evicted]]
        footer = [f"{tier}: {format_bytes(n)}" for tier, n in self.bytes_by_state.items()]
        footer.append(f"page reads {self.reads}, {self.offload_hit_rate:.0%} from host or disk; "
                      f"largest INT8 error {self.compression_error:.2%} of absmax; {self.tokens_removed} tokens pruned")
        budget = "" if self.budget_bytes is None else (
            f", {self.budget_used:.0%} of the {format_bytes(self.budget_bytes)} budget used")
        return html_table(f"KV cache: {self.tokens} tokens{budget}", ["pages", "count"], rows, footer)


def merge_attention(parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention over the union of disjoint key sets from each set's ``(out, lse)``
    (``[tokens, heads, head_dim]``, ``[tokens, heads]``, as :func:`ops.paged_attention`
    returns them): each part weighs ``exp(lse - total)``. ``sinks`` (``[heads]``) join the
    denominator once, with no value. A row no part saw stays 0."""
    lse = torch.stack([part_lse for _, part_lse in parts])
    total = torch.logsumexp(lse, dim=0)
    if sinks is not None:
        total = torch.logaddexp(total, sinks.float().view(1, -1))
    weights = torch.exp(lse - total).nan_to_num(0.0)  # -inf - -inf: a row that saw nothing
    out = sum(o.float() * w.unsqueeze(-1) for (o, _), w in zip(parts, weights))
    return out.to(parts[0][0].dtype)


class _Tier:
    """Page storage of one memory tier: ``slots`` full-precision pages per layer and K/V,
    each also seen as ``per_slot`` INT8 pages with float32 scales."""

    def __init__(self, cache: "PagedKVCache", where: int, slots: int):
        self.cache, self.where = weakref.proxy(cache), where  # the cache owns its tiers: no cycle to wait for gc
        self.per_slot = cache.dtype.itemsize  # INT8 pages per full-precision slot
        self.fp = self.q = self.scale = None  # allocated at the first page: a configured cache costs nothing
        self.slots = slots
        self.free_slots: list[int] = list(range(slots - 1, -1, -1))
        self.free_q: list[int] = []        # INT8 page ids in slots given to INT8 pages
        self.q_in_slot: dict[int, int] = {}  # slot -> INT8 pages used in it

    def _new(self, shape, dtype):
        c = self.cache
        if self.where == _DISK:
            n = math.prod(shape)
            fd, path = tempfile.mkstemp(prefix="memwarden-kv-", suffix=".bin", dir=c.disk_dir)
            os.close(fd)
            t = torch.from_file(path, shared=True, size=n, dtype=dtype).view(shape)
            os.unlink(path)  # the mapping keeps the file alive; nothing is left behind
            return t
        device = c.device if self.where == _DEVICE else torch.device("cpu")
        pin = self.where == _HOST and c.device.type == "cuda"
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)

    def _allocate(self) -> None:
        """Storage for ``self.slots`` slots, holding the pages of the storage it replaces."""
        c = self.cache
        # Head-major pages (the ops' HND layout): a head's tokens of a page lie together, so
        # attention, which reads one head's rows, streams them instead of striding.
        fp = self._new((c.num_layers, 2, self.slots, c.num_kv_heads, c.page_size, c.head_dim), c.dtype)
        scale = self._new((c.num_layers, 2, self.slots * self.per_slot, c.page_size, c.num_kv_heads), torch.float32) \
            if c._may_quantize else None
        if self.fp is not None:
            old = self.fp.shape[2]
            fp[:, :, :old].copy_(self.fp)
            if scale is not None:
                scale[:, :, : old * self.per_slot].copy_(self.scale)
        self.fp, self.scale = fp, scale
        self.q = fp.view(-1).view(torch.int8).view(c.num_layers, 2, self.slots * self.per_slot, c.num_kv_heads,
                                                    c.page_size, c.head_dim)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (0 before the first page)."""
        return 0 if self.fp is None else self.fp.nbytes + (self.scale.nbytes if self.scale is not None else 0)

    @property
    def used_slots(self) -> int:
        return self.slots - len(self.free_slots)

    def alloc(self, kind: str, n: int, grow: bool) -> Optional[list[int]]:
        """n page ids of ``kind`` ("fp" or "q"), or None when the tier is full and may not grow."""
        need = n if kind == "fp" else max(0, math.ceil((n - len(self.free_q)) / self.per_slot))
        if need > len(self.free_slots):
            if not grow:
                return None
            # a quarter more, not double: an unbudgeted cache (a server's request) then holds
            # at most ~1.25x its tokens, at a few more copies while it grows
            slots = max(self.slots + self.slots // 4, self.used_slots + need, 4)
            self.free_slots.extend(range(slots - 1, self.slots - 1, -1))
            self.slots = slots
            self._allocate()
        elif self.fp is None:
            self._allocate()
        if kind == "fp":
            return [self.free_slots.pop() for _ in range(n)]
        while len(self.free_q) < n:
            slot = self.free_slots.pop()
            self.q_in_slot[slot] = 0
            self.free_q.extend(range((slot + 1) * self.per_slot - 1, slot * self.per_slot - 1, -1))
        ids = [self.free_q.pop() for _ in range(n)]
        for i in ids:
            self.q_in_slot[i // self.per_slot] += 1
        return ids

    def free(self, kind: str, ids: Sequence[int]) -> None:
        if kind == "fp":
            self.free_slots.extend(ids)
            return
        for i in ids:
            slot = i // self.per_slot
            self.q_in_slot[slot] -= 1
            self.free_q.append(i)
            if self.q_in_slot[slot] == 0:  # the slot's INT8 pages are all free: it is a slot again
                del self.q_in_slot[slot]
                members = set(range(slot * self.per_slot, (slot + 1) * self.per_slot))
                self.free_q = [q for q in self.free_q if q not in members]
                self.free_slots.append(slot)

    def views(self, layer: int, kind: str):
        """(key_cache, value_cache, k_scale_cache, v_scale_cache) of one layer, the caches as
        the ops index them: ``[pages, page_size, kv_heads, head_dim]`` (HND strides)."""
        pages = self.fp if kind == "fp" else self.q
        key, value = (pages[layer, i].permute(0, 2, 1, 3) for i in (0, 1))
        if kind == "fp":
            return key, value, None, None
        return key, value, self.scale[layer, 0], self.scale[layer, 1]


@dataclass
class _Page:
    """One logical page: where it lies, its physical id per sequence, its positions."""

    tier: int
    kind: str                 # "fp" (full precision) or "q" (INT8)
    ids: list[int]            # per sequence of the batch
    positions: list[int]      # absolute positions of the tokens it holds, increasing
    last_use: int = 0
    evicted: bool = False
    start: int = 0            # index of its first token among all stored ones (see _reindex)


class PagedKVCache:
    """A paged K/V store for ``num_layers`` layers of ``num_kv_heads`` x ``head_dim``
    inside ``max_memory`` bytes of ``device`` memory (see the module docstring).

    ``add(layer, key, value)`` appends tokens (``[batch, kv_heads, tokens, head_dim]``,
    every layer in turn); ``get(layer)`` returns the live tokens as contiguous
    ``[batch, kv_heads, tokens, head_dim]`` tensors in ``dtype``.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, batch_size: int = 1,
                 page_size: int = 16, dtype: torch.dtype = torch.float16, device="cpu",
                 max_memory=None, threshold: float = 0.9, kv_dtype: str = "auto", compress: str = "pressure",
                 residual_length: int = 0, offload: str = "never", host_memory=None, disk_dir: Optional[str] = None,
                 missing: str = "raise"):
        where = "PagedKVCache: "
        self.num_layers = integer(num_layers, "num_layers", where=where)
        self.num_kv_heads = integer(num_kv_heads, "num_kv_heads", where=where)
        self.head_dim = integer(head_dim, "head_dim", where=where)
        self.batch_size = integer(batch_size, "batch_size", where=where)
        self.page_size = integer(page_size, "page_size", where=where)
        self.residual_length = integer(residual_length, "residual_length", minimum=0, where=where)
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{where}dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        self.dtype = dtype
        self.device = torch_device(device)
        for name, value, allowed in (("kv_dtype", kv_dtype, KV_DTYPES), ("compress", compress, COMPRESS_MODES),
                                     ("offload", offload, OFFLOAD_MODES), ("missing", missing, ("raise", "skip"))):
            if value not in allowed:
                raise ValueError(f"{where}{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"{where}threshold must be a number in (0, 1], got {threshold!r}")
        self.kv_dtype, self.offload, self.missing, self.threshold = kv_dtype, offload, missing, float(threshold)
        self.compress = "always" if kv_dtype != "auto" and compress == "pressure" else compress
        self._may_quantize = self.compress != "never"
        self.disk_dir = disk_dir
        self.max_memory = None if max_memory is None else parse_bytes(max_memory, "max_memory")
        self.host_memory = None if host_memory is None else parse_bytes(host_memory, "host_memory")
        per_slot = self.slot_bytes
        slots = 0
        if self.max_memory is not None:
            slots = self.max_memory // per_slot
            if slots < 2 * self.batch_size:
                raise ValueError(
                    f"{where}max_memory {format_bytes(self.max_memory)} holds {slots} page(s) of {self.page_size} tokens "
                    f"for all {self.num_layers} layers ({format_bytes(per_slot)} each); it needs at least 2 per sequence "
                    f"(batch_size {self.batch_size}): {format_bytes(2 * self.batch_size * per_slot)}")
        self._tiers: list[Optional[_Tier]] = [_Tier(self, _DEVICE, slots), None, None]
        self._pages: list[_Page] = []
        self._filled = [0] * self.num_layers  # tokens written per layer (the last page may be partly written)
        self._clock = 0
        self._evicted = self._removed = self._reads = self._offloaded_reads = 0
        self._compression_error = 0.0
        self._write_error: Optional[torch.Tensor] = None  # the same, of tokens written as INT8 (kept on the device)
        self._runs_cache = None
        self._run_tables: dict = {}
        self._next = 0

    # ------------------------------------------------------------------ sizes
    @property
    def slot_bytes(self) -> int:
        """Device bytes of one full-precision page for every layer, K and V, with the
        scales of the INT8 pages the slot can hold instead."""
        fp = 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        scales = 2 * self.num_layers * self.page_size * self.num_kv_heads * 4 * self.dtype.itemsize
        return fp + (scales if self._may_quantize else 0)

    def page_bytes(self, kind: str = "fp") -> int:
        """Bytes of one sequence's page for every layer, K and V: full precision (``"fp"``)
        or INT8 with its float32 scales (``"q"``)."""
        values = 2 * self.num_layers * self.page_size * self.num_kv_heads
        return values * (self.head_dim * self.dtype.itemsize if kind == "fp" else self.head_dim + 4)

    @property
    def seq_length(self) -> int:
        """The next token's position: tokens ever added, removed and evicted ones included
        (a :meth:`crop` takes it back)."""
        return self._next

    @property
    def positions(self) -> list[int]:
        """Absolute positions of the tokens :meth:`get` returns (live pages only)."""
        return [p for page in self._pages if not page.evicted for p in page.positions]

    def __len__(self) -> int:
        return sum(len(page.positions) for page in self._pages if not page.evicted)

    @property
    def full_precision(self) -> bool:
        """Whether every live page holds its values in ``dtype`` (none is INT8)."""
        return all(page.kind == "fp" for page in self._pages if not page.evicted)

    # ------------------------------------------------------------------ checks
    def _check_layer(self, layer) -> int:
        return integer(layer, "layer", minimum=0, maximum=self.num_layers - 1, where="PagedKVCache: ")

    def _check_kv(self, key, value) -> int:
        where = "PagedKVCache.add: "
        for name, t in (("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}{name} must be a torch.Tensor, got {type(t).__name__}")
            want = (self.batch_size, self.num_kv_heads, t.shape[2] if t.dim() == 4 else -1, self.head_dim)
            if t.dim() != 4 or tuple(t.shape) != want:
                raise ValueError(f"{where}{name} must be [batch_size={self.batch_size}, num_kv_heads="
                                 f"{self.num_kv_heads}, tokens, head_dim={self.head_dim}], got {list(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{where}{name} must be on {self.device}, got {t.device}")
        if key.shape != value.shape:
            raise ValueError(f"{where}key {list(key.shape)} and value {list(value.shape)} must have one shape")
        return key.shape[2]

    # ------------------------------------------------------------------ writing
    def add(self, layer: int, key: torch.Tensor, value: torch.Tensor, positions: Optional[Sequence[int]] = None) -> None:
        """Append ``key``/``value`` (``[batch, kv_heads, tokens, head_dim]``) to ``layer``.

        Layer 0 sets the positions of the new tokens (``positions``, increasing and after
        every earlier one; default: the next ones); every other layer then adds the same
        number of tokens. Casts to the cache's dtype."""
        layer = self._check_layer(layer)
        n = self._check_kv(key, value)
        if n == 0:
            return
        start = self._filled[layer]
        if layer == 0:
            self.enforce_budget()  # between steps: every layer has read what the step added
            self._extend(n, positions)
        elif start + n > self._filled[0]:
            raise ValueError(f"PagedKVCache.add: layer {layer} would hold {start + n} tokens but layer 0 holds "
                             f"{self._filled[0]}: add each step's tokens to layer 0 first")
        key, value = key.to(self.dtype), value.to(self.dtype)
        index = 0
        for page in self._pages_from(start):
            held = page.positions
            offset = max(0, start + index - page.start)
            take = min(len(held) - offset, n - index)
            if take <= 0:
                continue
            self._write(page, layer, key[:, :, index:index + take], value[:, :, index:index + take], offset)
            index += take
            if index == n:
                break
        self._filled[layer] = start + n
        if layer == self.num_layers - 1:
            self._clock += 1

    def _pages_from(self, token_index: int):
        for page in self._pages:
            if page.start + len(page.positions) > token_index:
                yield page

    def _reindex(self) -> None:
        start = 0
        for page in self._pages:
            page.start = start
            start += len(page.positions)
        self._runs_cache = None

    def _extend(self, n: int, positions) -> None:
        """Give layer 0's n new tokens their positions and pages."""
        last = self.seq_length - 1
        if positions is None:
            new = list(range(last + 1, last + 1 + n))
        else:
            new = [integer(p, "positions", minimum=0, where="PagedKVCache.add: ") for p in positions]
            if len(new) != n or any(b <= a for a, b in zip([last] + new, new)):
                raise ValueError(f"PagedKVCache.add: positions must be {n} increasing integers after {last}, got {new}")
        self._next = new[-1] + 1
        tail = self._pages[-1] if self._pages else None
        if tail is not None and not tail.evicted and len(tail.positions) < self.page_size and tail.tier == _DEVICE:
            room = self.page_size - len(tail.positions)
            tail.positions.extend(new[:room])
            new = new[room:]
        while new:
            kind = "q" if self.compress == "always" and self.residual_length == 0 else "fp"
            ids = self._alloc_device(kind)
            self._pages.append(_Page(_DEVICE, kind, ids, new[: self.page_size], self._clock))
            new = new[self.page_size:]
        self._reindex()

    def _write(self, page: _Page, layer: int, key, value, offset: int) -> None:
        tier = self._tiers[page.tier]
        kc, vc, ksc, vsc = tier.views(layer, page.kind)
        n = key.shape[2]
        for b, pid in enumerate(page.ids):
            slots = torch.arange(pid * self.page_size + offset, pid * self.page_size + offset + n,
                                 dtype=torch.int64, device=kc.device)
            ops.reshape_and_cache_flash(key[b].transpose(0, 1).to(kc.device), value[b].transpose(0, 1).to(kc.device),
                                        kc, vc, slots, "auto" if page.kind == "fp" else "int8_per_token_head",
                                        k_scale_cache=ksc, v_scale_cache=vsc)
        if page.kind == "q" and layer == 0:  # written as INT8 (never compressed): measure its error too
            pid, sequence_key = page.ids[0], key[0].transpose(0, 1).to(kc.device).float()
            back = kc[pid, offset:offset + n].float() * ksc[pid, offset:offset + n].unsqueeze(-1)
            error = (back - sequence_key).abs().amax() / sequence_key.abs().amax().clamp(min=1e-30)
            self._write_error = error if self._write_error is None else torch.maximum(self._write_error, error)
        page.last_use = self._clock

    # ------------------------------------------------------------------ reading
    def _runs(self):
        """Consecutive live pages of one tier and kind, all full but the last: one gather each."""
        if self._runs_cache is None:
            self._run_tables = {}  # (id(run), device) -> its block table and seq_lens, for attend()
            runs, current = [], []
            for page in self._pages:
                if page.evicted:
                    if current:
                        runs.append(current)
                    runs.append([page])
                    current = []
                    continue
                if current and ((current[-1].tier, current[-1].kind) != (page.tier, page.kind)
                                or len(current[-1].positions) < self.page_size):
                    runs.append(current)
                    current = []
                current.append(page)
            if current:
                runs.append(current)
            self._runs_cache = runs
        return self._runs_cache

    def _check_not_evicted(self, runs, method: str) -> None:
        """KVEvictedError naming the lost positions when a page was evicted and
        ``missing="raise"``."""
        if self.missing == "raise" and any(run[0].evicted for run in runs):
            lost = [p for run in runs if run[0].evicted for p in run[0].positions]
            raise KVEvictedError(f"PagedKVCache.{method}: positions {lost[0]}..{lost[-1]} ({len(lost)} tokens) were "
                                 "evicted by the memory policy (offload='evict'); pass missing='skip' to read what "
                                 "is left")

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The live tokens of ``layer`` as ``[batch, kv_heads, tokens, head_dim]`` (``dtype``).

        Raises :class:`KVEvictedError` when a page was evicted and ``missing="raise"``."""
        layer = self._check_layer(layer)
        total = self._filled[layer]
        runs = self._runs()
        self._check_not_evicted(runs, "get")
        live = total - sum(len(run[0].positions) for run in runs if run[0].evicted and run[0].start < total)
        shape = (self.batch_size, self.num_kv_heads, live, self.head_dim)
        key = torch.empty(shape, dtype=self.dtype, device=self.device)
        value = torch.empty(shape, dtype=self.dtype, device=self.device)
        out = 0
        for run in runs:
            if run[0].evicted:
                continue
            first = run[0].start
            if first >= total:
                break
            n = min(sum(len(p.positions) for p in run), total - first)
            self._gather(run, layer, key[:, :, out:out + n], value[:, :, out:out + n], n)
            out += n
        return key, value

    def _gather(self, run: list[_Page], layer: int, key_out, value_out, n: int) -> None:
        tier = self._tiers[run[0].tier]
        kc, vc, ksc, vsc = tier.views(layer, run[0].kind)
        dtype = "auto" if run[0].kind == "fp" else "int8_per_token_head"
        lens = torch.tensor([n], dtype=torch.int32, device=kc.device)
        remote = kc.device != self.device
        for b in range(self.batch_size):
            table = torch.tensor([[p.ids[b] for p in run]], dtype=torch.int32, device=kc.device)
            k_dst, v_dst = key_out[b].transpose(0, 1), value_out[b].transpose(0, 1)
            if remote:  # pages on the host: gather there, one copy over
                k_tmp = torch.empty(k_dst.shape, dtype=self.dtype)
                v_tmp = torch.empty(v_dst.shape, dtype=self.dtype)
                ops.gather_cache(kc, vc, table, lens, k_tmp, v_tmp, dtype, k_scale_cache=ksc, v_scale_cache=vsc)
                k_dst.copy_(k_tmp, non_blocking=True)
                v_dst.copy_(v_tmp, non_blocking=True)
            else:
                ops.gather_cache(kc, vc, table, lens, k_dst, v_dst, dtype, k_scale_cache=ksc, v_scale_cache=vsc)
        for page in run:
            page.last_use = self._clock
        self._reads += len(run)
        if run[0].tier != _DEVICE:
            self._offloaded_reads += len(run)

    def attend(self, layer: int, query: torch.Tensor, *, scale: Optional[float] = None,
               softcap: Optional[float] = None, sinks: Optional[torch.Tensor] = None,
               kv_start: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Causal attention of ``query`` ``[batch, num_heads, q_len, head_dim]`` (the newest
        ``q_len`` tokens of ``layer``, already added) over the layer's live tokens, read
        in place from the pages with :func:`~memwarden.kv.ops.paged_attention`: no dense
        K/V is made. Returns ``[batch, q_len, num_heads, head_dim]`` in query's dtype, or
        None when the queries reach back past the newest run of pages (the caller then
        reads :meth:`get` densely).

        Each run of pages of one tier and kind is one op call (INT8 pages are dequantized
        in registers); runs are merged by log-sum-exp, only the newest masked causally.
        ``kv_start`` ``[batch]`` hides each sequence's first keys (left padding), counted
        among the live tokens; ``sinks`` (``[num_heads]``) join the softmax once.
        Raises :class:`KVEvictedError` like :meth:`get`."""
        layer = self._check_layer(layer)
        batch, heads, q_len, head_dim = query.shape
        if batch != self.batch_size or head_dim != self.head_dim or heads % self.num_kv_heads:
            raise ValueError(f"PagedKVCache.attend: query must be [batch_size={self.batch_size}, a multiple of "
                             f"{self.num_kv_heads} heads, q_len, head_dim={self.head_dim}], got {list(query.shape)}")
        total = self._filled[layer]
        runs = self._runs()
        self._check_not_evicted(runs, "attend")
        runs = [run for run in runs if not run[0].evicted and run[0].start < total]
        if not runs:
            return None
        lengths = [min(sum(len(p.positions) for p in run), total - run[0].start) for run in runs]
        if q_len > lengths[-1]:
            return None
        rows = query.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
        loc = None if q_len == 1 else torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32,
                                                   device=query.device)
        results, first = [], 0
        for i, (run, n) in enumerate(zip(runs, lengths)):
            last = i == len(runs) - 1
            caches, table, lens, kv_cache_dtype = self._attention_pages(run, n, layer, query.device)
            starts = None if kv_start is None else (kv_start - first).clamp(0, n)
            results.append(ops.paged_attention(
                rows, *caches[:2], table, lens, scale,
                query_start_loc=loc, kv_cache_dtype=kv_cache_dtype, k_scale_cache=caches[2],
                v_scale_cache=caches[3], softcap=softcap, sinks=sinks if len(runs) == 1 else None,
                kv_start=starts, causal=last, return_lse=True))
            for page in run:
                page.last_use = self._clock
            first += n
        self._reads += sum(len(run) for run in runs)
        self._offloaded_reads += sum(len(run) for run in runs if run[0].tier != _DEVICE)
        out = results[0][0] if len(results) == 1 else merge_attention(results, sinks)
        return out.view(batch, q_len, heads, head_dim)

    def _attention_pages(self, run: list[_Page], n: int, layer: int, device: torch.device):
        """(key_cache, value_cache, k_scale_cache, v_scale_cache), block table, seq_lens
        (``n`` per sequence) and cache dtype of one run for the attention op on ``device``.
        A run on another device than the queries (host pages of a CUDA cache) is gathered
        there and copied over as one page per sequence."""
        tier = self._tiers[run[0].tier]
        caches = tier.views(layer, run[0].kind)
        kv_cache_dtype = "auto" if run[0].kind == "fp" else "int8_per_token_head"
        key = (id(run), caches[0].device)
        if key not in self._run_tables:  # every layer reads the same pages: one table per step
            self._run_tables[key] = (
                torch.tensor([[p.ids[b] for p in run] for b in range(self.batch_size)], dtype=torch.int32,
                             device=caches[0].device),
                torch.full((self.batch_size,), n, dtype=torch.int32, device=caches[0].device))
        table, lens = self._run_tables[key]
        if caches[0].device == device:
            return caches, table, lens, kv_cache_dtype
        shape = (self.batch_size * n, self.num_kv_heads, self.head_dim)
        k, v = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        ops.gather_cache(*caches[:2], table, lens, k, v, kv_cache_dtype, k_scale_cache=caches[2],
                         v_scale_cache=caches[3])
        dense = [t.to(device, non_blocking=True).view(self.batch_size, n, self.num_kv_heads, self.head_dim)
                 for t in (k, v)]
        one_page_each = torch.arange(self.batch_size, dtype=torch.int32, device=device).view(-1, 1)
        return (dense[0], dense[1], None, None), one_page_each, lens.to(device), "auto"

    # ------------------------------------------------------------------ policy
    def _alloc_device(self, kind: str) -> list[int]:
        device = self._tiers[_DEVICE]
        grow = self.max_memory is None
        ids = device.alloc(kind, self.batch_size, grow)
        if ids is None:
            self._make_room(self.batch_size if kind == "fp" else 1, hard=True)
            ids = device.alloc(kind, self.batch_size, grow)
        if ids is None:
            raise MemoryError(
                f"PagedKVCache: max_memory={format_bytes(self.max_memory)} ({device.slots} pages of "
                f"{self.page_size} tokens) cannot hold this step: only pages every layer has written can be "
                f"compressed or offloaded (compress={self.compress!r}, offload={self.offload!r}), and tokens are "
                "never evicted in the middle of a step; feed a long prompt in chunks or raise max_memory")
        return ids

    def enforce_budget(self) -> None:
        """Apply the policy (compress, then offload or evict) until the device is back under
        ``threshold``. :meth:`add` runs it when a step begins (layer 0), so the tokens of a
        step stay the same for every layer; a caller that knows a step has ended (the
        transformers Cache after its last layer) may run it then."""
        if self.max_memory is None and self.compress != "always":
            return
        if self.compress == "always":
            for page in self._candidates("fp"):
                self._compress(page)
        if self.max_memory is not None:
            self._make_room(0, hard=False)

    def _over(self, extra_slots: int, hard: bool) -> bool:
        device = self._tiers[_DEVICE]
        if hard:
            return len(device.free_slots) < extra_slots
        return device.used_slots > self.threshold * device.slots

    def _candidates(self, kind: str) -> list[_Page]:
        """Device pages of ``kind`` that every layer has written and that lie before the
        residual window, least recently used first."""
        written = min(self._filled)
        keep_from = self.seq_length - self.residual_length
        pages = [p for p in self._pages if p.tier == _DEVICE and p.kind == kind and not p.evicted
                 and len(p.positions) == self.page_size and p.start + self.page_size <= written
                 and p.positions[-1] < keep_from]
        return sorted(pages, key=lambda p: (p.last_use, p.start))

    def _make_room(self, extra_slots: int, hard: bool) -> None:
        if not self._over(extra_slots, hard):
            return
        if self._may_quantize:
            for page in self._candidates("fp"):
                self._compress(page)
                if not self._over(extra_slots, hard):
                    return
        if self.offload == "never" or (hard and self.offload == "evict"):  # no eviction inside a step
            return
        for page in self._candidates("q") + self._candidates("fp"):
            self._move_out(page)
            if not self._over(extra_slots, hard):
                return

    def _compress(self, page: _Page) -> None:
        """Re-store a device page as INT8. Its full-precision data is copied out first (one
        page of scratch memory), so the INT8 pages may reuse its own slots: compression
        works in a full pool and frees a slot for every ``per_slot`` pages."""
        device = self._tiers[_DEVICE]
        scratch = [[(kc[pid].clone(), vc[pid].clone()) for pid in page.ids]
                   for kc, vc, _, _ in (device.views(layer, "fp") for layer in range(self.num_layers))]
        device.free("fp", page.ids)
        ids = device.alloc("q", self.batch_size, grow=self.max_memory is None)
        for layer, rows in enumerate(scratch):
            qk, qv, ks, vs = device.views(layer, "q")
            for (key, value), dst in zip(rows, ids):
                slots = torch.arange(dst * self.page_size, (dst + 1) * self.page_size, device=qk.device)
                ops.reshape_and_cache_flash(key, value, qk, qv, slots, "int8_per_token_head",
                                            k_scale_cache=ks, v_scale_cache=vs)
        key, dst = scratch[0][0][0].float(), ids[0]  # the error seen, on layer 0's first sequence's keys
        back = device.views(0, "q")[0][dst].float() * device.views(0, "q")[2][dst].unsqueeze(-1)
        self._compression_error = max(self._compression_error,
                                      float((back - key).abs().amax() / key.abs().amax().clamp(min=1e-30)))
        page.kind, page.ids = "q", ids
        self._runs_cache = None

    def _move_out(self, page: _Page) -> None:
        """Offload ``page`` to the next tier down (host, then disk), or evict it."""
        if self.offload == "evict":
            self._tiers[page.tier].free(page.kind, page.ids)
            page.evicted, page.ids = True, []
            self._evicted += 1
            self._runs_cache = None
            return
        target, ids = self._offload_target(page.kind)
        src = self._tiers[page.tier]
        for layer in range(self.num_layers):
            s_views, d_views = src.views(layer, page.kind), target.views(layer, page.kind)
            for s_cache, d_cache in zip(s_views, d_views):
                if s_cache is None:
                    continue
                for a, b in zip(page.ids, ids):
                    d_cache[b].copy_(s_cache[a])
        src.free(page.kind, page.ids)
        page.tier, page.ids = target.where, ids
        self._runs_cache = None

    def _offload_target(self, kind: str) -> tuple[_Tier, list[int]]:
        """Where an offloaded page goes and its ids there: host memory (unbounded, or
        ``host_memory`` with ``offload="host+disk"``), then a file on disk."""
        bounded = self.offload == "host+disk" and self.host_memory is not None
        host = self._tiers[_HOST]
        if host is None:
            host = self._tiers[_HOST] = _Tier(self, _HOST, self.host_memory // self.slot_bytes if bounded else 0)
        ids = host.alloc(kind, self.batch_size, grow=not bounded)
        if ids is not None:
            return host, ids
        if self._tiers[_DISK] is None:
            self._tiers[_DISK] = _Tier(self, _DISK, 0)
        return self._tiers[_DISK], self._tiers[_DISK].alloc(kind, self.batch_size, grow=True)

    # ------------------------------------------------------------------ pruning
    def remove_tokens(self, positions: Sequence[int]) -> int:
        """Drop the tokens at these absolute positions from every layer and sequence; a
        page left empty is freed. Returns how many tokens were removed."""
        drop = {integer(p, "positions", minimum=0, where="PagedKVCache.remove_tokens: ") for p in positions}
        if min(self._filled) != max(self._filled):
            raise RuntimeError("PagedKVCache.remove_tokens: a step is half written (some layers have fewer tokens)")
        removed = 0
        for page in list(self._pages):
            keep = [i for i, p in enumerate(page.positions) if p not in drop]
            if len(keep) == len(page.positions):
                continue
            removed += len(page.positions) - len(keep)
            if not keep or page.evicted:
                if not page.evicted:
                    self._tiers[page.tier].free(page.kind, page.ids)
                page.positions = [page.positions[i] for i in keep]
                if not page.positions:
                    self._pages.remove(page)
                continue
            self._compact(page, keep)
        self._removed += removed
        self._filled = [self._filled[0] - removed] * self.num_layers
        self._reindex()
        return removed

    def _compact(self, page: _Page, keep: list[int]) -> None:
        """Move the kept tokens of ``page`` to its front."""
        tier = self._tiers[page.tier]
        index = torch.tensor(keep, device=tier.fp.device)
        for layer in range(self.num_layers):
            for cache in tier.views(layer, page.kind):
                if cache is None:
                    continue
                for pid in page.ids:
                    cache[pid, : len(keep)] = cache[pid].index_select(0, index)
        page.positions = [page.positions[i] for i in keep]

    def prune_streaming(self, sinks: int, window: int) -> int:
        """StreamingLLM: keep the first ``sinks`` tokens and the ``window`` most recent, drop
        the rest (whole pages only, so up to ``page_size - 1`` more recent tokens stay)."""
        sinks = integer(sinks, "sinks", minimum=0, where="PagedKVCache.prune_streaming: ")
        window = integer(window, "window", where="PagedKVCache.prune_streaming: ")
        live = self.positions
        if len(live) <= sinks + window:
            return 0
        protected = set(live[:sinks]) | set(live[-window:])
        drop = [p for page in self._pages if not page.evicted and not protected & set(page.positions)
                for p in page.positions]
        return self.remove_tokens(drop) if drop else 0

    def prune_scores(self, scores: torch.Tensor, keep: int, protect_recent: int = 0) -> int:
        """H2O: keep the ``keep`` live tokens with the highest ``scores`` (accumulated
        attention, one per token of :attr:`positions`) and the ``protect_recent`` newest."""
        where = "PagedKVCache.prune_scores: "
        keep = integer(keep, "keep", minimum=0, where=where)
        protect_recent = integer(protect_recent, "protect_recent", minimum=0, where=where)
        live = self.positions
        if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.numel() != len(live):
            raise ValueError(f"{where}scores must be a 1-D tensor with one score per live token ({len(live)})")
        ranked = scores.detach().float().cpu().argsort(descending=True).tolist()
        kept = set(ranked[:keep]) | set(range(max(0, len(live) - protect_recent), len(live)))
        return self.remove_tokens([p for i, p in enumerate(live) if i not in kept])

    def crop(self, tokens: int) -> None:
        """Forget the ``tokens`` newest tokens (assisted decoding rolls back rejected ones);
        the next token takes the first cropped position."""
        tokens = integer(tokens, "tokens", minimum=0, where="PagedKVCache.crop: ")
        stored = [p for page in self._pages for p in page.positions]
        if tokens > len(stored):
            raise ValueError(f"PagedKVCache.crop: tokens {tokens} is more than the {len(stored)} stored")
        if tokens:
            cut = stored[-tokens:]
            self.remove_tokens(cut)
            self._removed -= tokens  # a rollback, not pruning
            self._next = cut[0]

    # ------------------------------------------------------------------ batch
    def select(self, indices: Sequence[int]) -> None:
        """Keep the sequences ``indices`` (repeats allowed: beam search copies them). Room
        for the copies is made first (the policy may compress or offload pages then, never
        while they are being copied); a copy on host memory or disk may grow that tier."""
        indices = [integer(i, "indices", minimum=0, maximum=self.batch_size - 1, where="PagedKVCache.select: ")
                   for i in indices]
        if not indices:
            raise ValueError("PagedKVCache.select: indices must not be empty")
        extra = len(indices) - len(set(indices))
        device_pages = [p for p in self._pages if p.tier == _DEVICE and not p.evicted]
        if extra and device_pages and self.max_memory is not None:
            need = extra * len(device_pages)  # at most one slot per copy
            self._make_room(need, hard=True)
            device_pages = [p for p in self._pages if p.tier == _DEVICE and not p.evicted]
            if len(self._tiers[_DEVICE].free_slots) < extra * len(device_pages):
                raise MemoryError(f"PagedKVCache.select: no room in max_memory={format_bytes(self.max_memory)} for "
                                  f"{extra} more copies of {len(device_pages)} pages (beam search copies a "
                                  "sequence's pages for every extra beam)")
        for page in self._pages:
            if page.evicted:
                continue
            tier = self._tiers[page.tier]
            taken, ids = set(), []
            for i in indices:
                if i not in taken:
                    taken.add(i)
                    ids.append(page.ids[i])
                    continue
                (copy,) = tier.alloc(page.kind, 1, grow=page.tier != _DEVICE or self.max_memory is None)
                for layer in range(self.num_layers):
                    for cache in tier.views(layer, page.kind):
                        if cache is not None:
                            cache[copy].copy_(cache[page.ids[i]])
                ids.append(copy)
            tier.free(page.kind, [pid for j, pid in enumerate(page.ids) if j not in taken])
            page.ids = ids
        self.batch_size = len(indices)
        self._runs_cache = None  # the runs' block tables changed

    def reset(self) -> None:
        """Forget every token (the storage stays allocated)."""
        for page in self._pages:
            if not page.evicted:
                self._tiers[page.tier].free(page.kind, page.ids)
        self._pages = []
        self._filled = [0] * self.num_layers
        self._next = 0
        self._runs_cache = None

    # ------------------------------------------------------------------ stats
    def stats(self) -> KVCacheStats:
        """The pages and their bytes now: one pass over the pages, cheap enough to take at
        every step (:class:`~memwarden.kv.cache.PagedCache` keeps a history of them)."""
        census = collections.Counter((p.tier, p.kind) for p in self._pages if not p.evicted)
        by_state = {}
        for name, where in zip(_TIER_NAMES, (_DEVICE, _HOST, _DISK)):
            kinds = {kind: n for (tier, kind), n in census.items() if tier == where}
            if kinds or where == _DEVICE:
                by_state[name] = sum(n * self.page_bytes(kind) * self.batch_size for kind, n in kinds.items())
        device = self._tiers[_DEVICE]
        compression_error = max(self._compression_error, 0.0 if self._write_error is None else float(self._write_error))
        return KVCacheStats(
            tokens=len(self), pages_resident=census[_DEVICE, "fp"], pages_compressed=census[_DEVICE, "q"],
            pages_offloaded=sum(n for (tier, _), n in census.items() if tier != _DEVICE),
            pages_evicted=self._evicted, bytes_by_state=by_state,
            budget_bytes=self.max_memory,
            budget_used=None if self.max_memory is None else device.used_slots / max(device.slots, 1),
            offloaded_reads=self._offloaded_reads, reads=self._reads, compression_error=compression_error,
            tokens_removed=self._removed)

    @property
    def nbytes(self) -> int:
        """Bytes of storage held on the device: under a budget the pool, allocated in full at
        the first page (0 before)."""
        return self._tiers[_DEVICE].nbytes

    def __repr__(self) -> str:
        return (f"<PagedKVCache {self.stats()}; {self.num_layers} layers, pages of {self.page_size} tokens, "
                f"{str(self.dtype).removeprefix('torch.')} on {self.device}>")

    def _repr_html_(self) -> str:
        return self.stats()._repr_html_()
