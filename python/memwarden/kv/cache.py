"""The transformers ``Cache`` backed by memwarden's paged KV cache (home of ``PagedCache``).

Contract: ``model.generate(past_key_values=memwarden.kv.PagedCache(model.config, ...))``
works for every decoder transformers runs with its own ``DynamicCache``. Full-attention
layers keep their K/V in one :class:`~memwarden.kv.paged.PagedKVCache` (pages, a budget,
INT8 compression, offload and pruning); every other layer type (sliding window, chunked,
linear attention) is the layer class transformers itself would use, since a sliding
layer holds at most its window. Supported: transformers 5.18 (pinned) to 5.24. Following transformers'
``cache_utils`` design, the variants (full attention, sliding window, INT8 pages) are
per-layer strategy objects composed by one ``Cache`` subclass, not subclasses of the
cache. Pages are written with :mod:`memwarden.kv.ops` (``reshape_and_cache_flash``) and
read back with ``gather_cache`` or, with ``attn_implementation="memwarden_paged"``
(:mod:`memwarden.kv.attention`), attended over in place by the paged attention op
(INT8 pages included), with no dense K/V made. Blocks come from the
block manager (``memwarden.kv.BlockPool`` / ``KVCacheManager``); the memory budget,
FP16 -> INT8 compression and LRU eviction/offload of pages happen here, and an
out-of-memory callback registered with :func:`memwarden.alloc.on_oom` asks this cache to
give memory back.

May import: transformers (here and in :mod:`memwarden.kv.attention`, nowhere else in
memwarden, and only when these modules are imported), torch, :mod:`memwarden.kv.attention`, :mod:`memwarden.kv.ops`, :mod:`memwarden.alloc`,
:mod:`memwarden.quant`, and the bottom layers (``_native``, ``_units``, ``_devices``,
``_table``, ``_checks``, ``_plot``). Never controller, serve, testing or cli.
"""
from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from memwarden._checks import integer
from memwarden._units import byte_unit, format_bytes, parse_bytes
from memwarden.kv.attention import ATTENTION_NAME, paged_states
from memwarden.kv.paged import KV_DTYPES, KVCacheStats, PagedKVCache

__all__ = ["CacheStep", "PagedCache", "PagedLayer", "PRUNE_MODES"]

PRUNE_MODES = (None, "streaming")


def _page_reader(which: int, name: str):
    """Getter and setter of ``PagedLayer.keys``/``values``: a dense copy read from the
    pages; only None may be assigned (by transformers' base class)."""
    def get(self):
        return self._cache.store.get(self.store_index)[which] if self.is_initialized else None

    def set(self, value):
        if value is not None:
            raise AttributeError(f"PagedLayer.{name} is read from the pages; write with update()")

    return get, set


class PagedLayer(CacheLayerMixin):
    """One full-attention layer of a :class:`PagedCache`: its tokens live in the cache's
    shared :class:`PagedKVCache` under index ``store_index``. ``keys``/``values`` read the
    pages on access (a dense copy; nothing dense is kept between steps)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, cache: "PagedCache", store_index: int):
        # weakly: the cache owns its layers, and a cycle would keep its pages until gc runs
        self._cache, self.store_index = weakref.proxy(cache), store_index
        super().__init__()

    # Read from the pages on access (CacheLayerMixin.__init__ assigns None).
    keys = property(*_page_reader(0, "keys"))
    values = property(*_page_reader(1, "values"))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._cache._ensure_store(key_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the step's K/V into the pages; return the layer's full K/V: dense, or with
        the ``"memwarden_paged"`` backend stand-ins that it reads from the pages in place."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self._cache
        if self.store_index == 0:
            cache._end_step()
        store = cache.store
        empty = len(store) == 0
        store.add(self.store_index, key_states, value_states)
        if self.store_index == len(cache._paged) - 1:
            cache._step_pending = True  # pruning and the budget wait until every layer has attended
        if getattr(cache.config, "_attn_implementation", None) == ATTENTION_NAME:
            # A first step into full-precision pages: the step's K/V are the layer's K/V.
            fresh = (key_states, value_states) if empty and store.full_precision else None
            return paged_states(store, self.store_index, fresh)
        return store.get(self.store_index)

    def get_seq_length(self) -> int:
        self._cache._end_step()
        return self._cache.store.seq_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The live past plus the queries; the offset counts the pruned or evicted past
        tokens, so the causal mask still compares true positions."""
        if not self.is_initialized:
            return query_length, 0
        self._cache._end_step()
        store = self._cache.store  # masks are made before a step: every layer holds the same tokens
        live = len(store)
        return live + query_length, store.seq_length - live

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.16 asks this
        return -1

    # The pages are shared by every paged layer: PagedCache applies these once.
    def reset(self) -> None:
        self.is_initialized = False  # PagedCache.reset drops the store: the next batch may differ

    def crop(self, tokens_to_remove: int) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def offload(self):  # Cache(offloading=True) is not how this cache offloads
        pass

    def prefetch(self):
        pass


@dataclass(frozen=True)
class CacheStep:
    """A :class:`PagedCache`'s pages at the end of one forward step (after pruning and the
    budget): counts as :class:`~memwarden.kv.paged.KVCacheStats` has them, and the bytes
    the pages of each state take (every layer and sequence, K and V, INT8 scales included;
    offloaded: on host memory or disk)."""

    step: int                 # 0 is the first forward (the prompt)
    tokens: int
    pages_resident: int
    pages_compressed: int
    pages_offloaded: int
    pages_evicted: int
    bytes_resident: int
    bytes_compressed: int
    bytes_offloaded: int


class PagedCache(Cache):
    """A transformers ``Cache`` whose full-attention layers keep their K/V in pages
    inside ``max_memory`` (see :class:`~memwarden.kv.paged.PagedKVCache` for the policy)::

        cache = PagedCache(model.config, max_memory="1GiB", kv_dtype="int8")
        model.generate(**inputs, past_key_values=cache)
        print(cache.stats())

    Options (the store's, see its docstring): ``kv_dtype`` ``"auto"`` (pages in the
    model's dtype), ``"int8"``/``"int8_per_token_head"`` (INT8 pages with one scale per
    token and head, the ``residual_length`` newest tokens in full precision);
    ``compress`` ``"pressure"``/``"always"``/``"never"``; ``offload``
    ``"never"``/``"host"``/``"host+disk"``/``"evict"`` (an evicting cache lets the model
    attend to what is left, like StreamingLLM, instead of raising); ``prune`` ``None`` or
    ``"streaming"`` (keep ``sinks`` first and ``window`` newest tokens after each step).
    :attr:`history` keeps the pages of the last ``history`` steps (:class:`CacheStep`),
    which :meth:`plot` draws against the budget (0: none kept, nothing spent on it).
    """

    def __init__(self, config, *, max_memory=None, kv_dtype: str = "auto", compress: str = "pressure",
                 residual_length: int = 0, offload: str = "never", prune: Optional[str] = None, sinks: int = 4,
                 window: int = 1024, page_size: int = 16, threshold: float = 0.9, host_memory=None,
                 disk_dir: Optional[str] = None, history: int = 1024):
        if not hasattr(config, "get_text_config"):
            raise TypeError(f"PagedCache: config must be a transformers PretrainedConfig (model.config), "
                            f"got {type(config).__name__}")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"PagedCache: kv_dtype must be one of {', '.join(map(repr, KV_DTYPES))}, got {kv_dtype!r}")
        if prune not in PRUNE_MODES:
            raise ValueError(f"PagedCache: prune must be None or 'streaming', got {prune!r}")
        text = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        if isinstance(layer_kwargs, dict):  # transformers < 5.24: one dict for every layer
            layer_kwargs = [layer_kwargs] * len(layer_types)
        layers, self._paged = [], []
        for layer_type, kwargs in zip(layer_types, layer_kwargs):
            if layer_type == "full_attention":
                layers.append(PagedLayer(self, len(self._paged)))
                self._paged.append(layers[-1])
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        super().__init__(layers=layers)
        self.config = text
        self._options = dict(max_memory=None if max_memory is None else parse_bytes(max_memory, "max_memory"), kv_dtype=kv_dtype, compress=compress,
                             residual_length=residual_length, offload=offload, page_size=page_size,
                             threshold=threshold,
                             host_memory=None if host_memory is None else parse_bytes(host_memory, "host_memory"),
                             disk_dir=disk_dir,
                             missing="skip" if offload == "evict" else "raise")
        self.prune, self.sinks, self.window = prune, sinks, window
        self.store: Optional[PagedKVCache] = None
        self._step_pending = False
        self._history: collections.deque[CacheStep] = collections.deque(
            maxlen=integer(history, "history", minimum=0, where="PagedCache: "))
        self._steps_ended = 0
        if not self._paged:
            return
        # Check the options now (a bad budget or mode fails here, not in the first forward);
        # a store allocates nothing before its first page.
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        dtype = getattr(text, "dtype", None)
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        PagedKVCache(len(self._paged), kv_heads, head_dim,
                     dtype=dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32,
                     **self._options)

    def _ensure_store(self, key_states: torch.Tensor) -> None:
        if self.store is None:
            batch, heads, _, head_dim = key_states.shape
            self.store = PagedKVCache(len(self._paged), heads, head_dim, batch_size=batch, dtype=key_states.dtype,
                                      device=key_states.device, **self._options)

    def _end_step(self) -> None:
        """After a step's last paged layer has attended (so before the next step's masks or
        first write, or a read of the cache): prune, then keep the budget, so the next
        step's masks see what its layers will read."""
        if not self._step_pending:
            return
        self._step_pending = False
        if self.prune == "streaming":
            self.store.prune_streaming(self.sinks, self.window)
        self.store.enforce_budget()
        self._record_step()

    def _record_step(self) -> None:
        """Append the pages as the step leaves them (the store's stats) to :attr:`history`."""
        self._steps_ended += 1
        if not self._history.maxlen:  # history=0: not even the stats pass
            return
        store, stats = self.store, self.store.stats()
        self._history.append(CacheStep(
            self._steps_ended - 1, stats.tokens, stats.pages_resident, stats.pages_compressed, stats.pages_offloaded,
            stats.pages_evicted, stats.pages_resident * store.page_bytes("fp") * store.batch_size,
            stats.pages_compressed * store.page_bytes("q") * store.batch_size,
            sum(n for tier, n in stats.bytes_by_state.items() if tier != "device")))

    def stats(self) -> KVCacheStats:
        """The paged store's statistics (all zeros before the first forward)."""
        self._end_step()
        if self.store is None:
            budget = self._options["max_memory"]
            return KVCacheStats(0, 0, 0, 0, 0, budget_bytes=budget, budget_used=None if budget is None else 0.0)
        return self.store.stats()

    @property
    def history(self) -> list[CacheStep]:
        """The pages at the end of each of the last ``history`` steps, oldest first."""
        self._end_step()
        return list(self._history)

    def __repr__(self) -> str:
        return (f"<PagedCache {self.stats()}; {len(self._paged)} of {len(self.layers)} layers paged, "
                f"kv_dtype {self._options['kv_dtype']!r}, offload {self._options['offload']!r}>")

    def _repr_html_(self) -> str:
        return self.stats()._repr_html_()

    def plot(self):
        """A matplotlib Figure of :attr:`history`: the bytes of the resident, compressed
        (INT8) and offloaded pages at each step as stacked areas, and the device budget (which
        the offloaded pages, stacked on top, are not part of)."""
        from memwarden._plot import figure

        steps = self.history
        budget = self._options["max_memory"]
        scale, unit = byte_unit(max([budget or 0] + [s.bytes_resident + s.bytes_compressed + s.bytes_offloaded
                                                     for s in steps]))
        fig = figure(8, 3.5)
        ax = fig.add_subplot()
        x = [s.step for s in steps]
        ax.stackplot(x, *([getattr(s, f"bytes_{state}") / scale for s in steps]
                          for state in ("resident", "compressed", "offloaded")),
                     labels=["resident (full precision)", "compressed (INT8)", "offloaded (host or disk)"],
                     colors=["#3b7dd8", "#6bbf59", "#e8a33d"])
        if budget is not None:
            ax.axhline(budget / scale, color="black", linestyle="--", linewidth=1,
                       label=f"device budget {format_bytes(budget)}")  # offloaded pages are outside it
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        last = f"{steps[-1].tokens} tokens at step {steps[-1].step}" if steps else "no steps yet"
        ax.set_title(f"KV cache pages over the generation: {last}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the areas, not on them
        return fig

    # The shared store first, then transformers' own layers.
    def reset(self) -> None:
        self.store = None  # built again at the next update, for that batch
        self._step_pending = False
        self._history.clear()  # a new batch: a new generation
        self._steps_ended = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        self._end_step()
        if self.store is not None:  # negative: that many tokens; positive: the length to keep (legacy)
            current = self.store.seq_length
            remove = -tokens_to_remove if tokens_to_remove < 0 else (
                max(0, current - tokens_to_remove) if tokens_to_remove > 0 else 0)
            self.store.crop(min(remove, len(self.store)))
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._end_step()
        if self.store is not None:
            self.store.select(beam_idx.tolist())
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._end_step()
        if self.store is not None:
            self.store.select([i for i in range(self.store.batch_size) for _ in range(repeats)])
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._end_step()
        if self.store is not None:
            self.store.select(torch.as_tensor(indices).tolist())
        super().batch_select_indices(indices)

    @property
    def max_batch_size(self) -> int:  # transformers < 5.24 reads it
        return self.store.batch_size if self.store is not None else -1

