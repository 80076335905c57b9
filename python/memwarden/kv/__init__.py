"""Paged KV cache: vLLM-compatible cache ops on CPU and CUDA (with INT8 cache dtypes)
and the block manager that decides which block holds which tokens.

* :mod:`memwarden.kv.ops` -- ``reshape_and_cache_flash``, ``reshape_and_cache``,
  ``copy_blocks``, ``swap_blocks``, ``gather_cache`` and ``paged_attention`` (attention
  over the pages read in place, INT8 included) (``torch.ops.memwarden.*``).
* :class:`BlockPool` -- fixed set of blocks, O(1) intrusive free queue, ref counts,
  prefix-hash cache with LRU eviction, all-or-nothing allocation.
* :class:`KVCacheManager` -- sequences on top of a pool: prefix reuse, append with
  copy-on-write after ``fork``, swap-out/in mappings, statistics.
* :class:`PagedKVCache` (:mod:`memwarden.kv.paged`) -- K/V pages for every layer inside
  a memory budget: INT8 compression, offload to host/disk, eviction, pruning, stats.
* :class:`PagedCache` (:mod:`memwarden.kv.cache`) -- the transformers ``Cache`` on top,
  for ``model.generate(past_key_values=...)``, and :mod:`memwarden.kv.attention`, the
  ``"memwarden_paged"`` attention backend that attends over its pages in place; imported on
  first use (the two modules of memwarden.kv that import transformers).

The constructor and every method of :class:`BlockPool` and :class:`KVCacheManager` that
takes arguments checks them here before the binding sees them (the table ``_ARGUMENTS``):
integers with ``memwarden._checks.integer`` in the range of the core's C++ type (no
bools, floats or strings), token/block lists element by element, flags True/False only.
A bad one is a ValueError (TypeError for a non-list or a non-bool flag) naming it, e.g.
``ValueError: BlockPool.touch: block must be an integer in [-2147483648, 2147483647], got
2147483648``, and nothing changes.

See docs/kv.md.
"""
import inspect

from memwarden import _native
from memwarden._checks import INT32_MAX, integer
from memwarden._table import html_table
from memwarden.kv import ops
from memwarden.kv.ops import copy_blocks, gather_cache, gather_kv, reshape_and_cache, reshape_and_cache_flash, swap_blocks
from memwarden.kv.paged import KVCacheStats, KVEvictedError, PagedKVCache

_C = _native.load()

BlockPool = _C.kv.BlockPool
hash_block = _C.kv.hash_block
ROOT_HASH = _C.kv.ROOT_HASH


class KVCacheManager(_C.kv.KVCacheManager):
    """Sequences on top of a :class:`BlockPool` (``memwarden._C.kv.KVCacheManager``, whose
    methods it has): ``KVCacheManager(num_blocks, block_size, num_host_blocks=0,
    enable_prefix_caching=True)``. The sizes are checked here first
    (``memwarden._checks.integer``): ``num_blocks``/``num_host_blocks`` in [0, 2^31 - 2],
    ``block_size`` in [1, 2^31 - 2]; otherwise a ValueError names the argument. So are
    the arguments of every method (see :mod:`memwarden.kv`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        s = self.stats()
        host = (f", host {s['num_host_blocks'] - s['num_free_host_blocks']} of {s['num_host_blocks']} blocks in use"
                if s["num_host_blocks"] else "")
        return (f"<KVCacheManager: {s['usage']:.1%} of {s['num_blocks']} blocks of {self.block_size} tokens in use, "
                f"{len(self.sequence_ids())} sequences, prefix hit rate {s['prefix_hit_rate']:.1%}{host}>")

    def _repr_html_(self) -> str:
        s = self.stats()
        pools = [("device", s["num_blocks"], s["num_free_blocks"])]
        if s["num_host_blocks"]:
            pools.append(("host", s["num_host_blocks"], s["num_free_host_blocks"]))
        rows = [[name, _share(total - free, total), total - free, free, (total - free) * self.block_size]
                for name, total, free in pools]
        footer = [f"{s['num_cached_blocks']} prefix-cached blocks; prefix hits {s['prefix_hit_tokens']} of "
                  f"{s['prefix_query_tokens']} tokens ({s['prefix_hit_rate']:.1%}), {s['num_evictions']} evictions",
                  f"{s['num_cow_copies']} copy-on-write copies, {s['num_swapped_out']} swapped out, "
                  f"{s['num_swapped_in']} swapped in"]
        return html_table(f"KVCacheManager: {s['usage']:.1%} of {s['num_blocks']} blocks in use, "
                          f"{len(self.sequence_ids())} sequences, blocks of {self.block_size} tokens",
                          ["pool", "usage", "blocks in use", "blocks free", "token slots in use"], rows, footer)


KVCacheManager.__module__ = __name__


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"  # a pool may have no blocks


def _block_pool_html(pool) -> str:
    used = pool.num_blocks - pool.num_free
    return html_table(f"BlockPool: {_share(used, pool.num_blocks)} in use ({used} of {pool.num_blocks} blocks)",
                      ["blocks", "count"], [["in use", used], ["free", pool.num_free], ["prefix-cached", pool.num_cached]],
                      [f"{pool.num_evictions} cached blocks evicted for reuse"])


BlockPool._repr_html_ = _block_pool_html  # its repr is the binding's


# ---- argument checks -------------------------------------------------------------------
# A kind checks one argument: kind(value, name, where) -> the value to pass on.

def _integers(minimum, maximum):
    """An integer in [minimum, maximum] (the range of the C++ parameter's type)."""
    def kind(value, name, where):
        if type(value) is int and minimum <= value <= maximum:
            return value  # what integer() returns, without building its message
        return integer(value, name, minimum=minimum, maximum=maximum, where=where)
    return kind


def _integer_list(minimum, maximum):
    """A list (any sequence but a string; a numpy array or tensor through ``tolist``) of
    integers in [minimum, maximum]; a bad element is named ``name[i]``."""
    def kind(value, name, where):
        items = None
        if not isinstance(value, (str, bytes, dict)) and hasattr(value, "__len__") and hasattr(value, "__getitem__"):
            items = value if type(value) is list else value.tolist() if hasattr(value, "tolist") else list(value)
        if not isinstance(items, list):  # also a 0-d array, whose tolist() is a number
            raise TypeError(f"{where}{name} must be a list of integers, got {type(value).__name__}")
        if set(map(type, items)) <= {int} and (not items or (minimum <= min(items) and max(items) <= maximum)):
            return items  # the common case, at C speed
        return [integer(v, f"{name}[{i}]", minimum=minimum, maximum=maximum, where=where) for i, v in enumerate(items)]
    return kind


def _flag(value, name, where):
    if value is True or value is False:
        return value
    raise TypeError(f"{where}{name} must be True or False, got {value!r}")


_INT32, _INT64 = _integers(-(2**31), INT32_MAX), _integers(-(2**63), 2**63 - 1)
_UINT64 = _integers(0, 2**64 - 1)                   # extra_key, hash
_BLOCKS = _integers(0, INT32_MAX - 1)               # a pool's size: ids and the queue's sentinel fit in int32
_TOKENS = _BLOCK_IDS = _integer_list(-(2**31), INT32_MAX)
_NO_DEFAULT = inspect.Parameter.empty

# class -> method -> its parameters (name, kind[, default]), in the binding's order. The
# core's types: block ids and counts int32, sequence ids and token positions int64,
# hashes and extra keys uint64, tokens int32. A default is the binding's own.
_ARGUMENTS = {
    BlockPool: {
        "__init__": (("num_blocks", _BLOCKS), ("enable_caching", _flag, True)),
        "allocate": (("n", _integers(0, INT32_MAX)),),
        "touch": (("block", _INT32),),
        "release": (("blocks", _BLOCK_IDS),),
        "cache": (("block", _INT32), ("hash", _UINT64)),
        "lookup": (("hash", _UINT64),),
        "hash_of": (("block", _INT32),),
        "ref_count": (("block", _INT32),),
    },
    KVCacheManager: {
        "__init__": (("num_blocks", _BLOCKS), ("block_size", _integers(1, INT32_MAX - 1)),
                     ("num_host_blocks", _BLOCKS, 0), ("enable_prefix_caching", _flag, True)),
        "add_sequence": (("seq_id", _INT64), ("tokens", _TOKENS), ("extra_key", _UINT64, 0)),
        "append": (("seq_id", _INT64), ("tokens", _TOKENS)),
        "fork": (("parent", _INT64), ("child", _INT64)),
        "lookup": (("tokens", _TOKENS), ("extra_key", _UINT64, 0)),
        "slot_mapping": (("seq_id", _INT64), ("start", _INT64), ("end", _INT64)),
        **{m: (("seq_id", _INT64),) for m in ("free_sequence", "swap_out", "swap_in", "has_sequence", "is_swapped",
                                               "block_table", "num_tokens")},
    },
}


def _checked(cls, method, params):
    """``cls.method`` (the binding's) behind a check of its arguments; docstring kept."""
    native = getattr(cls, method)
    native = getattr(native, "__wrapped__", native)  # a reloaded module wraps the native class once
    where = f"{cls.__name__}: " if method == "__init__" else f"{cls.__name__}.{method}: "
    names = tuple(p[0] for p in params)
    kinds = tuple(p[1] for p in params)
    defaults = {p[0]: p[2] for p in params if len(p) == 3}

    signature = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(n, _NO_DEFAULT))
           for n in names])

    def call(self, *args, **kwargs):
        if kwargs or len(args) != len(names):  # Python's own binding, for keywords and defaults
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{where}{e}") from None
            bound.apply_defaults()
            args = tuple(bound.arguments.values())[1:]
        return native(self, *[kind(v, name, where) for kind, name, v in zip(kinds, names, args)])

    call.__name__, call.__qualname__, call.__doc__ = method, f"{cls.__qualname__}.{method}", native.__doc__
    call.__module__, call.__wrapped__, call.__signature__ = __name__, native, signature
    return call


# BlockPool is the native class itself (so the pools a manager returns are checked too).
for _cls, _methods in _ARGUMENTS.items():
    for _method, _params in _methods.items():
        setattr(_cls, _method, _checked(_cls, _method, _params))
del _cls, _methods, _method, _params

def __getattr__(name: str):
    if name in ("PagedCache", "PagedLayer"):  # imports transformers: only when asked for
        from memwarden.kv import cache
        return getattr(cache, name)
    raise AttributeError(f"module 'memwarden.kv' has no attribute {name!r}")


__all__ = [
    "BlockPool",
    "KVCacheManager",
    "KVCacheStats",
    "KVEvictedError",
    "PagedCache",
    "PagedKVCache",
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
