"""The ``"memwarden_paged"`` transformers attention backend: attention over the pages of a
:class:`~memwarden.kv.cache.PagedCache`, read in place by the paged attention op (INT8
pages dequantized in registers), with no dense K/V made.

Use::

    import memwarden.kv.attention  # registers "memwarden_paged" (also done by PagedCache)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="memwarden_paged")
    model.generate(**inputs, past_key_values=PagedCache(model.config, kv_dtype="int8"))

How: with this backend a :class:`PagedCache` layer's ``update`` writes the new K/V into
the pages and returns :class:`PagedStates` stand-ins for the full K/V (their shape, no
data). This function recognises them and calls :meth:`PagedKVCache.attend`. Everything
else gives the result the model would get without memwarden: any other cache, sliding
window or other non-paged layers, a mask that is not causal-with-left-padding, queries
that reach back past the newest pages (a prefill over compressed pages), dropout or
``output_attentions`` take the dense path, transformers' own SDPA function, or the
model's own eager function when it uses logit soft-capping or attention sinks, which
SDPA lacks (a stand-in read by any other code materialises its dense K/V first, so it
never gives a wrong result). Masks: transformers' ``sdpa_mask`` (``None`` when causal
alone is enough, else a boolean mask).

May import: transformers, torch, :mod:`memwarden.kv.paged` and :mod:`memwarden.kv.ops`.
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import Optional

import torch
from torch.utils._pytree import tree_map
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from memwarden.kv.paged import PagedKVCache

__all__ = ["ATTENTION_NAME", "PagedStates", "paged_attention_forward", "register"]

ATTENTION_NAME = "memwarden_paged"


class _LayerRead:
    """One layer's K/V as of one step; the dense copy is read from the pages at most once.
    ``fresh``: the step's own K/V when the layer held nothing before it (a prefill), which
    are then the whole dense K/V."""

    __slots__ = ("store", "layer", "fresh", "_dense")

    def __init__(self, store: PagedKVCache, layer: int, fresh=None):
        self.store, self.layer, self.fresh, self._dense = store, layer, fresh, fresh

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._dense is None:
            self._dense = self.store.get(self.layer)
        return self._dense


class PagedStates(torch.Tensor):
    """Stand-in for a paged layer's full keys or values ``[batch, kv_heads, tokens,
    head_dim]``: it has their shape, dtype and device but holds no data. The
    ``"memwarden_paged"`` backend reads the pages instead; any torch operation on it runs
    on the dense K/V read from the pages (so other code still gets the right numbers)."""

    @staticmethod
    def __new__(cls, read: _LayerRead, which: int, shape, dtype, device):
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
        self.read, self.which = read, which
        return self

    def dense(self) -> torch.Tensor:
        return self.read.dense()[self.which]

    def __repr__(self) -> str:
        return f"PagedStates(layer={self.read.layer}, shape={list(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def dense(x):
            return x.dense() if isinstance(x, PagedStates) else x

        return func(*tree_map(dense, args), **tree_map(dense, kwargs or {}))


def paged_states(store: PagedKVCache, layer: int, fresh=None) -> tuple[PagedStates, PagedStates]:
    """(keys, values) stand-ins of ``layer`` of ``store`` for this step (``fresh``: the
    step's (key, value) when they are all the layer holds)."""
    read = _LayerRead(store, layer, fresh)
    shape = (store.batch_size, store.num_kv_heads, len(store), store.head_dim)
    return (PagedStates(read, 0, shape, store.dtype, store.device),
            PagedStates(read, 1, shape, store.dtype, store.device))


# (mask, kv_start) of this thread's last call: a model passes every layer the same mask.
# Per thread, since models may run in several threads at once (a server's requests); the
# mask only weakly, or each idle thread would keep its last prompt's mask alive.
_mask_memo = threading.local()


def _causal_mask(q_len: int, kv_len: int, device, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool ``[batch or 1, 1, q_len, kv_len]``: the queries are the last ``q_len`` of
    ``kv_len`` positions and see the keys up to their own, from ``start`` (per sequence)."""
    keys = torch.arange(kv_len, device=device)
    visible = keys[None, :] <= torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    if start is None:
        return visible[None, None]
    return (visible[None] & (keys[None, None, :] >= start[:, None, None]))[:, None]


def _kv_start(mask: Optional[torch.Tensor], q_len: int, kv_len: int):
    """Per-sequence number of hidden leading keys if ``mask`` (bool ``[batch, 1 or heads,
    q_len, kv_len]``) is exactly causal with left padding, else False; None for no mask."""
    if mask is None:
        return None
    if getattr(_mask_memo, "mask", lambda: None)() is mask:
        return _mask_memo.kv_start
    result = False
    if mask.dtype == torch.bool and mask.dim() == 4 and tuple(mask.shape[-2:]) == (q_len, kv_len):
        last_row = mask[:, 0, -1, :]
        # the first visible key of the newest query (all hidden: kv_len)
        start = torch.where(last_row.any(-1), last_row.int().argmax(-1), kv_len)
        if torch.equal(mask, _causal_mask(q_len, kv_len, mask.device, start).expand_as(mask)):
            result = start
    _mask_memo.mask, _mask_memo.kv_start = weakref.ref(mask), result
    return result


def _as_eager_mask(mask: Optional[torch.Tensor], query: torch.Tensor, kv_len: int) -> torch.Tensor:
    """An additive float mask for an eager attention function (which takes None as "see
    everything", not as causal)."""
    if mask is None:
        mask = _causal_mask(query.shape[2], kv_len, query.device)
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min)


def _sinks(module, kwargs) -> Optional[torch.Tensor]:
    """The attention sinks' logits of a gpt-oss style layer (passed as ``s_aux``), or None."""
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = getattr(module, "sinks", None)
    return sinks if isinstance(sinks, torch.Tensor) else None


def _dense_attention(module, query, key, value, attention_mask, **kwargs):
    """What the model computes without memwarden: SDPA, or the model's own eager function
    when it needs logit soft-capping or sinks."""
    if isinstance(key, PagedStates):
        key, value = key.dense(), value.dense()
    needs_eager = bool(kwargs.get("softcap")) or _sinks(module, kwargs) is not None
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if needs_eager and eager is not None:
        mask = _as_eager_mask(attention_mask, query, key.shape[2])
        return eager(module, query, key, value, mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _in_place(module, key, value, kwargs) -> bool:
    """Whether the call can attend over the pages: a PagedCache layer's stand-ins, and
    nothing the paged op lacks (dropout while training, a window, attention weights, a
    position bias). A prefill into an empty cache has its dense K/V at hand (``fresh``):
    SDPA's prefill kernels beat reading the pages back."""
    return (isinstance(key, PagedStates) and isinstance(value, PagedStates) and key.read is value.read
            and key.read.fresh is None and not (module.training and kwargs.get("dropout", 0.0))
            and kwargs.get("sliding_window") is None and not kwargs.get("output_attentions")
            and kwargs.get("position_bias") is None)


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], **kwargs):
    """The ``"memwarden_paged"`` attention function (transformers' signature: query
    ``[batch, heads, q_len, head_dim]``; returns ``([batch, q_len, heads, head_dim], None)``)."""
    if _in_place(module, key, value, kwargs):
        kv_start = _kv_start(attention_mask, query.shape[2], key.shape[2])
        if kv_start is not False:
            sinks = _sinks(module, kwargs)
            read = key.read
            out = read.store.attend(read.layer, query, scale=kwargs.get("scaling"), softcap=kwargs.get("softcap"),
                                    sinks=None if sinks is None else sinks.detach(), kv_start=kv_start)
            if out is not None:
                return out, None
    return _dense_attention(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register ``"memwarden_paged"`` with transformers' attention and mask interfaces
    (idempotent; importing this module does it)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()
