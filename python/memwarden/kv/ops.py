"""Paged KV cache ops with vLLM's call shapes (``torch.ops.memwarden.*``), on CPU and CUDA.

All ops but :func:`paged_attention` (which returns new tensors) write in place and
return ``None``. Layouts:

* flash: key/value cache ``[num_blocks, block_size, num_heads, head_size]`` (NHD); the
  HND physical layout is a permuted view of a ``[num_blocks, num_heads, block_size,
  head_size]`` tensor (``.permute(0, 2, 1, 3)``). Only the last dimension must be
  contiguous.
* legacy (``reshape_and_cache``): key ``[num_blocks, num_heads, head_size // x,
  block_size, x]`` with ``x = 16 // element_size``, value ``[num_blocks, num_heads,
  head_size, block_size]``, both contiguous.

A token goes to ``slot = block * block_size + offset``; a negative slot is skipped and
the token count is ``slot_mapping.size(0)`` (key/value may be longer, i.e. padded).

``kv_cache_dtype``:

* ``"auto"``: stored as is (cache dtype = key dtype).
* ``"int8"``: static symmetric INT8; ``k_scale``/``v_scale`` are float32 with 1 or
  ``num_heads`` elements, each positive and finite (see Scale checking); stored
  ``q = saturate(round_half_even(x * (1 / scale)))``, dequantized ``q * scale``.
* ``"int8_per_token_head"``: dynamic symmetric INT8 with one float32 scale per (token,
  head) (``absmax / 127``), written to ``k_scale_cache``/``v_scale_cache`` shaped
  ``[num_blocks, block_size, num_heads]`` (flash layout only).

Index checking: on CPU every slot, block id and sequence length is checked before
anything is written (``IndexError``/``ValueError`` naming the argument). On CUDA the
index tensors are checked the same way on a host copy, unless the stream is being
captured into a CUDA graph or the checks are switched off. That copy synchronises the
stream, which costs tens of microseconds per call (more than the write itself at decode
sizes): a server whose slot mappings and block tables come from a block manager it
trusts switches them off with :func:`set_cuda_index_checks` or :func:`cuda_index_checks`.
Either way the kernels skip any out-of-range index on the device, so nothing is ever
written or read out of bounds.

Scale checking (``"int8"``): a ``k_scale``/``v_scale`` value that is 0, negative, NaN or
Inf is a ``ValueError`` naming it and the value (it would quantize every value to 0, wiping
the cache). On CPU it is always checked. On CUDA both scales are copied to the host (one
small copy) and checked together with the index checks: under the same switch
(:func:`set_cuda_index_checks`) and not while a CUDA graph is being captured. With the
checks off nothing is copied, nothing synchronises, and the scales are used as given.
``"auto"`` and ``"int8_per_token_head"`` do not read ``k_scale``/``v_scale``: the wrappers
replace one on another device than the cache (the meta device, say) by their default (ones
on the cache's device for the writes, ``None`` for :func:`gather_cache`). The dispatcher
picks the kernel from every tensor argument, so such a scale would otherwise send the
whole call to that device's kernel (a meta one to the Meta kernel: nothing written, no
index checked, no error).

Overlap: the tensors an op writes (caches, scale caches, ``key_out``/``value_out``,
``copy_blocks``' caches, ``swap_blocks``' ``dst``) are checked like torch's in-place ops: no
two elements of one in the same memory (a stride-0 dimension, as from ``expand()``), and
no memory shared with another argument (``ValueError: reshape_and_cache_flash: key_cache
and value_cache overlap ...``). Views torch cannot decide cheaply (not dense, such as
``cache[:, 0]`` and ``cache[:, 1]`` of a ``[num_blocks, 2, ...]`` tensor) pass, as in torch.
``swap_blocks`` accepts ``src`` and ``dst`` being the same tensor (moving blocks within one
cache), not partly overlapping views.

Argument types are checked in Python first: a cache, index or scale that is not a
``torch.Tensor`` (a list, say), or a ``kv_cache_dtype`` that is not a ``str``, is a
``TypeError`` naming the argument; an unknown ``kv_cache_dtype`` string, or a
``swap_blocks`` ``block_size_in_bytes`` that is not an integer in ``[0, 2**63 - 1]``, is a
``ValueError`` naming it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from memwarden import _checks, _native

_C = _native.load()  # registers torch.ops.memwarden.*

__all__ = [
    "copy_blocks",
    "cuda_index_checks",
    "cuda_index_checks_enabled",
    "gather_cache",
    "gather_kv",
    "paged_attention",
    "reshape_and_cache",
    "reshape_and_cache_flash",
    "set_cuda_index_checks",
    "swap_blocks",
]


def cuda_index_checks_enabled() -> bool:
    """Whether CUDA ops check index values on the host before writing (the default)."""
    return _C.paged_kv.cuda_index_checks()


def set_cuda_index_checks(enabled: bool) -> bool:
    """Switch the host-side index checks of the CUDA ops on or off (process-wide); returns
    the previous setting. Out-of-range indices are skipped on the device either way."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_cuda_index_checks: enabled must be a bool, got {type(enabled).__name__}")
    return _C.paged_kv.set_cuda_index_checks(enabled)


@contextlib.contextmanager
def cuda_index_checks(enabled: bool) -> Iterator[None]:
    """Context manager: CUDA index checks on or off inside the block, restored after."""
    previous = set_cuda_index_checks(enabled)
    try:
        yield
    finally:
        set_cuda_index_checks(previous)

KV_CACHE_DTYPES = ("auto", "int8", "int8_per_token_head")
_INT_DTYPES = (torch.int32, torch.int64)


def _check_tensors(op: str, **tensors) -> None:
    """TypeError naming the first argument that is not a tensor."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _check_index_dtype(op: str, name: str, t: torch.Tensor, dtypes=(torch.int64,)) -> None:
    if t.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must be {wanted}, got {t.dtype}")


def _check_optional_tensors(op: str, **tensors) -> None:
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(value).__name__}")


def _check_tensor_list(op: str, name: str, value) -> list:
    """One tensor per layer: a list or tuple of tensors (a tensor itself is refused: iterating
    it would treat each block as a layer)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of torch.Tensor (one per layer), got {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(value)


def _check_kv_cache_dtype(op: str, kv_cache_dtype) -> None:
    """TypeError unless a str, ValueError unless one of KV_CACHE_DTYPES (the op schema would
    raise RuntimeError for a non-str, naming no argument)."""
    wanted = ", ".join(repr(d) for d in KV_CACHE_DTYPES)
    if not isinstance(kv_cache_dtype, str):
        raise TypeError(f"{op}: kv_cache_dtype must be a str, one of {wanted}, got {type(kv_cache_dtype).__name__}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"{op}: kv_cache_dtype must be one of {wanted}, got {kv_cache_dtype!r}")


def _unit_scale(device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def _static_scale(kv_cache_dtype: str, scale: Optional[torch.Tensor], cache: torch.Tensor, required: bool):
    """``k_scale``/``v_scale`` as the op gets it: an absent one, and one that the cache dtype
    does not read (all but ``"int8"``) on another device than ``cache``, become the default
    (ones on the cache's device when the schema requires a tensor, else None). Left as is, an
    unread meta scale would send the call to the Meta kernel, which writes nothing."""
    if scale is None or (kv_cache_dtype != "int8" and scale.device != cache.device):
        return _unit_scale(cache.device) if required else None
    return scale


_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_out_dtype(op: str, out_dtype, kv_cache_dtype: str, cache: torch.Tensor) -> torch.dtype:
    """gather_kv's output dtype (default: the cache's for "auto", float16 for INT8), checked
    as gather_cache checks key_out: the cache's dtype for "auto", a float dtype for INT8."""
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"{op}: out_dtype must be a torch.dtype or None, got {type(out_dtype).__name__}")
    if kv_cache_dtype == "auto":
        if out_dtype is not None and out_dtype != cache.dtype:
            raise TypeError(f"{op}: out_dtype must be the cache's dtype ({cache.dtype}) with kv_cache_dtype "
                            f"\"auto\", got {out_dtype}")
        return cache.dtype
    if out_dtype is not None and out_dtype not in _OUT_DTYPES:
        wanted = ", ".join(str(d) for d in _OUT_DTYPES)
        raise TypeError(f"{op}: out_dtype must be one of {wanted} with kv_cache_dtype {kv_cache_dtype!r}, "
                        f"got {out_dtype}")
    return torch.float16 if out_dtype is None else out_dtype


def reshape_and_cache_flash(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_heads, head_size]`` into the flash-layout
    caches at ``slot_mapping`` (int64 ``[num_tokens]``).

    ``k_scale``/``v_scale`` default to ones (they are only read for ``"int8"``, where each
    value must be positive and finite: checked on CPU, and on CUDA on a host copy with the
    index checks, i.e. not when those are off or during CUDA graph capture; with the other
    dtypes one on another device than the cache, meta say, is replaced by ones on the
    cache's device, not sent to the op);
    ``k_scale_cache``/``v_scale_cache`` are required for ``"int8_per_token_head"``. The
    caches and scale caches must not overlap each other or the inputs.
    """
    op = "reshape_and_cache_flash"
    _check_tensors(op, key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    _check_optional_tensors(op, k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache,
                            v_scale_cache=v_scale_cache)
    _check_index_dtype(op, "slot_mapping", slot_mapping)
    _check_kv_cache_dtype(op, kv_cache_dtype)
    k_scale = _static_scale(kv_cache_dtype, k_scale, key_cache, required=True)
    v_scale = _static_scale(kv_cache_dtype, v_scale, key_cache, required=True)
    torch.ops.memwarden.reshape_and_cache_flash(
        key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, k_scale_cache, v_scale_cache
    )


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Write ``key``/``value`` into the legacy paged-attention layout (``"auto"`` or ``"int8"``).

    The ``"int8"`` scales and overlapping arguments are checked, and unread scales on
    another device replaced by ones, as in :func:`reshape_and_cache_flash`."""
    op = "reshape_and_cache"
    _check_tensors(op, key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    _check_optional_tensors(op, k_scale=k_scale, v_scale=v_scale)
    _check_index_dtype(op, "slot_mapping", slot_mapping)
    _check_kv_cache_dtype(op, kv_cache_dtype)
    k_scale = _static_scale(kv_cache_dtype, k_scale, key_cache, required=True)
    v_scale = _static_scale(kv_cache_dtype, v_scale, key_cache, required=True)
    torch.ops.memwarden.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)


def copy_blocks(key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """Copy block ``src`` to block ``dst`` for each row ``(src, dst)`` of ``block_mapping``
    (int64 ``[n, 2]``) in every cache of every layer (copy-on-write). A source may fan out
    to several destinations; a block must not be a destination twice, nor both a source
    and a destination, in one call (checked on CPU)."""
    key_caches = _check_tensor_list("copy_blocks", "key_caches", key_caches)
    value_caches = _check_tensor_list("copy_blocks", "value_caches", value_caches)
    _check_tensors("copy_blocks", block_mapping=block_mapping)
    _check_index_dtype("copy_blocks", "block_mapping", block_mapping)
    torch.ops.memwarden.copy_blocks(key_caches, value_caches, block_mapping)


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, block_size_in_bytes: int, block_mapping: torch.Tensor) -> None:
    """Copy the first ``block_size_in_bytes`` bytes of block ``s`` of ``src`` to block ``d`` of
    ``dst`` for each row ``(s, d)`` of ``block_mapping`` (a CPU int64 ``[n, 2]`` tensor).
    Dimension 0 of ``src``/``dst`` indexes blocks. CUDA <-> host (pinned host memory makes it
    asynchronous), CUDA <-> CUDA, and host <-> host. Pairs run in parallel: a destination
    may appear once, and when ``src`` and ``dst`` are the same tensor no block may be both a
    source and a destination.

    ``block_size_in_bytes`` is an integer (not a bool, float or str) in ``[0, 2**63 - 1]``
    (a ``ValueError`` naming it, from Python), at most the bytes of one block of ``src`` and
    of ``dst`` (a ``ValueError`` from the op)."""
    _check_tensors("swap_blocks", src=src, dst=dst, block_mapping=block_mapping)
    _check_index_dtype("swap_blocks", "block_mapping", block_mapping)
    block_size_in_bytes = _checks.integer(block_size_in_bytes, "block_size_in_bytes", minimum=0,
                                          maximum=_checks.INT64_MAX, where="swap_blocks: ")
    torch.ops.memwarden.swap_blocks(src, dst, block_size_in_bytes, block_mapping)


def gather_cache(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
) -> None:
    """Write the first ``seq_lens[i]`` tokens of each sequence (pages ``block_table[i]``,
    int32/int64 ``[num_seqs, max_blocks]``) back to back into ``key_out``/``value_out``
    ``[sum(seq_lens), num_heads, head_size]``, dequantizing INT8 caches to their dtype.

    ``"int8"`` scales must be positive and finite (checked on CPU, and on CUDA on a host
    copy with the index checks, i.e. not when those are off or during CUDA graph
    capture); with ``"auto"`` and ``"int8_per_token_head"``, which do not read them, one on
    another device than the cache (meta, say) is dropped (passed as None). ``key_out``/
    ``value_out`` must not overlap each other or any input."""
    op = "gather_cache"
    _check_tensors(op, key_cache=key_cache, value_cache=value_cache, block_table=block_table, seq_lens=seq_lens,
                   key_out=key_out, value_out=value_out)
    _check_optional_tensors(op, k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache,
                            v_scale_cache=v_scale_cache)
    _check_index_dtype(op, "block_table", block_table, _INT_DTYPES)
    _check_index_dtype(op, "seq_lens", seq_lens, _INT_DTYPES)
    _check_kv_cache_dtype(op, kv_cache_dtype)
    k_scale = _static_scale(kv_cache_dtype, k_scale, key_cache, required=False)
    v_scale = _static_scale(kv_cache_dtype, v_scale, key_cache, required=False)
    torch.ops.memwarden.gather_cache(
        key_cache, value_cache, block_table, seq_lens, key_out, value_out, kv_cache_dtype, k_scale, v_scale,
        k_scale_cache, v_scale_cache,
    )


def gather_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_cache_dtype: str = "auto",
    *,
    out_dtype: Optional[torch.dtype] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_cache` into new tensors; returns ``(key, value)``
    ``[sum(seq_lens), num_heads, head_size]`` of ``out_dtype`` (default: the cache dtype for
    ``"auto"``, float16 for INT8). Reads ``sum(seq_lens)`` (a device sync on CUDA).

    ``out_dtype`` and the scales are keyword-only (positionally, ``k_scale`` would stand one
    place later than in :func:`gather_cache`).

    ``kv_cache_dtype``, ``out_dtype`` (the cache's dtype for ``"auto"``; float32, float16 or
    bfloat16 for INT8: a ``TypeError`` naming it) and ``seq_lens`` (int32/int64
    ``[num_seqs]`` on the cache's device, every entry >= 0) are checked before anything is
    allocated; the scales are checked (and unread ones replaced) by :func:`gather_cache`
    (errors name ``gather_cache``).
    """
    op = "gather_kv"
    _check_tensors(op, key_cache=key_cache, value_cache=value_cache, block_table=block_table, seq_lens=seq_lens)
    _check_optional_tensors(op, k_scale=k_scale, v_scale=v_scale, k_scale_cache=k_scale_cache,
                            v_scale_cache=v_scale_cache)
    _check_kv_cache_dtype(op, kv_cache_dtype)
    out_dtype = _check_out_dtype(op, out_dtype, kv_cache_dtype, key_cache)
    if key_cache.dim() != 4:
        raise ValueError(f"{op}: key_cache must be [num_blocks, block_size, num_heads, head_size], "
                         f"got shape {list(key_cache.shape)}")
    _check_index_dtype(op, "block_table", block_table, _INT_DTYPES)
    _check_index_dtype(op, "seq_lens", seq_lens, _INT_DTYPES)
    if seq_lens.dim() != 1:
        raise ValueError(f"{op}: seq_lens must be 1-D [num_seqs], got shape {list(seq_lens.shape)}")
    if seq_lens.device != key_cache.device:
        raise ValueError(f"{op}: seq_lens must be on {key_cache.device} like key_cache, got {seq_lens.device}")
    host_lens = seq_lens.cpu()  # one device-to-host copy for the check and the total
    negative = (host_lens < 0).nonzero()
    if negative.numel():
        i = int(negative[0, 0])
        raise ValueError(f"{op}: seq_lens[{i}] = {int(host_lens[i])} must be >= 0")
    total = int(host_lens.sum())
    shape = (total, key_cache.size(2), key_cache.size(3))
    key = torch.empty(shape, dtype=out_dtype, device=key_cache.device)
    value = torch.empty(shape, dtype=out_dtype, device=key_cache.device)
    gather_cache(key_cache, value_cache, block_table, seq_lens, key, value, kv_cache_dtype, k_scale, v_scale,
                 k_scale_cache, v_scale_cache)
    return key, value


def _real_number(value, name: str, op: str) -> float:
    """A float argument: int or float, not bool (the schema would take True as 1.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: Optional[float] = None,
    *,
    query_start_loc: Optional[torch.Tensor] = None,
    kv_cache_dtype: str = "auto",
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    v_scale_cache: Optional[torch.Tensor] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    kv_start: Optional[torch.Tensor] = None,
    causal: bool = True,
    return_lse: bool = False,
):
    """Attention of ``query`` ``[num_tokens, num_heads, head_size]`` over a flash-layout paged
    cache read in place (INT8 pages dequantized in registers); returns ``out`` shaped like
    ``query``, or ``(out, lse)`` with ``return_lse`` (``lse`` float32 ``[num_tokens,
    num_heads]``, the log of each row's softmax denominator: ``-inf`` for a row that sees no
    key, whose output is 0), which merges attention over several caches exactly.

    Sequence ``s`` reads pages ``block_tables[s]`` (int32/int64 ``[num_seqs, max_blocks]``)
    and its first ``seq_lens[s]`` tokens, the new queries' own tokens included. Its queries
    are rows ``query_start_loc[s]:query_start_loc[s + 1]`` (int32/int64 ``[num_seqs + 1]``,
    vLLM's varlen convention; default one query per sequence). With ``causal`` query ``i``
    of ``q_len`` sits at position ``seq_len - q_len + i`` and sees the keys up to it
    (chunked prefill, speculative verification); without, every query sees the whole
    context. Options: ``scale`` (default ``head_size ** -0.5``), ``sliding_window`` (the
    newest keys a query sees, itself included), ``softcap`` (``softcap * tanh(logit /
    softcap)``, Gemma 2), ``sinks`` (float ``[num_heads]`` logits that join the softmax
    denominator, gpt-oss), ``kv_start`` (``[num_seqs]``: keys before it are never seen, for
    left-padded batches). Grouped-query attention: query head ``h`` reads kv head ``h //
    (num_heads // num_kv_heads)``. ``kv_cache_dtype``, the scales and the index checks are
    those of :func:`gather_cache`; accumulation is in float32.
    """
    op = "paged_attention"
    _check_tensors(op, query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                   seq_lens=seq_lens)
    _check_optional_tensors(op, query_start_loc=query_start_loc, k_scale=k_scale, v_scale=v_scale,
                            k_scale_cache=k_scale_cache, v_scale_cache=v_scale_cache, sinks=sinks, kv_start=kv_start)
    _check_index_dtype(op, "block_tables", block_tables, _INT_DTYPES)
    _check_index_dtype(op, "seq_lens", seq_lens, _INT_DTYPES)
    for name, t in (("query_start_loc", query_start_loc), ("kv_start", kv_start)):
        if t is not None:
            _check_index_dtype(op, name, t, _INT_DTYPES)
    _check_kv_cache_dtype(op, kv_cache_dtype)
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__}")
    if scale is None:
        scale = query.size(-1) ** -0.5 if query.dim() == 3 and query.size(-1) > 0 else 1.0
    scale = _real_number(scale, "scale", op)
    softcap = 0.0 if softcap is None else _real_number(softcap, "softcap", op)
    window = -1 if sliding_window is None else _checks.integer(sliding_window, "sliding_window", minimum=1,
                                                               maximum=_checks.INT64_MAX, where=f"{op}: ")
    k_scale = _static_scale(kv_cache_dtype, k_scale, key_cache, required=False)
    v_scale = _static_scale(kv_cache_dtype, v_scale, key_cache, required=False)
    out, lse = torch.ops.memwarden.paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens, scale, query_start_loc, kv_cache_dtype, k_scale,
        v_scale, k_scale_cache, v_scale_cache, window, softcap, sinks, kv_start, causal,
    )
    return (out, lse) if return_lse else out
