"""The transformers ``Cache`` backed by memwarden's paged KV cache (home of ``PagedCache``).

Contract: ``model.generate(past_key_values=memwarden.kv.PagedCache(...))`` works for
every decoder transformers runs with its own ``DynamicCache``. Following transformers'
``cache_utils`` design, the variants (full attention, sliding window, INT8 pages) are
per-layer strategy objects composed by one ``Cache`` subclass, not subclasses of the
cache. Pages are written with :mod:`memwarden.kv.ops` (``reshape_and_cache_flash``) and
read back with ``gather_cache`` or, registered as a transformers attention backend, the
paged attention op that reads the pages (INT8 included) in place. Blocks come from the
block manager (``memwarden.kv.BlockPool`` / ``KVCacheManager``); the memory budget,
FP16 -> INT8 compression and LRU eviction/offload of pages happen here, and an
out-of-memory callback registered with :func:`memwarden.alloc.on_oom` asks this cache to
give memory back.

May import: transformers (imported here and nowhere else in memwarden, and only when this
module is imported), torch, :mod:`memwarden.kv.ops`, :mod:`memwarden.alloc`,
:mod:`memwarden.quant`, and the bottom layers (``_native``, ``_units``, ``_devices``,
``_table``). Never controller, serve, testing or cli.
"""
