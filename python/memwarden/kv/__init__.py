"""Paged KV cache: vLLM-compatible cache ops on CPU and CUDA (with INT8 cache dtypes)
and the block manager that decides which block holds which tokens.

* :mod:`memwarden.kv.ops` -- ``reshape_and_cache_flash``, ``reshape_and_cache``,
  ``copy_blocks``, ``swap_blocks``, ``gather_cache`` (``torch.ops.memwarden.*``).
* :class:`BlockPool` -- fixed set of blocks, O(1) intrusive free queue, ref counts,
  prefix-hash cache with LRU eviction, all-or-nothing allocation.
* :class:`KVCacheManager` -- sequences on top of a pool: prefix reuse, append with
  copy-on-write after ``fork``, swap-out/in mappings, statistics.
* :mod:`memwarden.kv.cache` -- the transformers ``Cache`` on top (imported on its own:
  it is the one module of memwarden.kv that imports transformers).

See docs/kv.md.
"""
from memwarden import _native
from memwarden.kv import ops
from memwarden.kv.ops import copy_blocks, gather_cache, gather_kv, reshape_and_cache, reshape_and_cache_flash, swap_blocks

_C = _native.load()

BlockPool = _C.kv.BlockPool
KVCacheManager = _C.kv.KVCacheManager
hash_block = _C.kv.hash_block
ROOT_HASH = _C.kv.ROOT_HASH

__all__ = [
    "BlockPool",
    "KVCacheManager",
    "ROOT_HASH",
    "copy_blocks",
    "gather_cache",
    "gather_kv",
    "hash_block",
    "ops",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "swap_blocks",
]
