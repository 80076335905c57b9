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
from memwarden._checks import INT32_MAX, integer
from memwarden.kv import ops
from memwarden.kv.ops import copy_blocks, gather_cache, gather_kv, reshape_and_cache, reshape_and_cache_flash, swap_blocks

_C = _native.load()

BlockPool = _C.kv.BlockPool
hash_block = _C.kv.hash_block
ROOT_HASH = _C.kv.ROOT_HASH

class KVCacheManager(_C.kv.KVCacheManager):
    """Sequences on top of a :class:`BlockPool` (``memwarden._C.kv.KVCacheManager``, whose
    methods it has): ``KVCacheManager(num_blocks, block_size, num_host_blocks=0,
    enable_prefix_caching=True)``. The sizes are checked here first
    (``memwarden._checks.integer``): ``num_blocks``/``num_host_blocks`` in [0, 2^31 - 2],
    ``block_size`` in [1, 2^31 - 2]; otherwise a ValueError names the argument."""

    __slots__ = ()

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0,
                 enable_prefix_caching: bool = True) -> None:
        where = "KVCacheManager: "  # the core counts blocks in int32
        num_blocks = integer(num_blocks, "num_blocks", minimum=0, maximum=INT32_MAX - 1, where=where)
        block_size = integer(block_size, "block_size", minimum=1, maximum=INT32_MAX - 1, where=where)
        num_host_blocks = integer(num_host_blocks, "num_host_blocks", minimum=0, maximum=INT32_MAX - 1, where=where)
        super().__init__(num_blocks, block_size, num_host_blocks, enable_prefix_caching)


KVCacheManager.__module__ = __name__

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
