"""Memory formulas, one definition each: KV cache, recurrent state, activations, reserves.

Everything here is arithmetic on a ``memwarden.models.ModelSpec``; nothing is built or
loaded. ``plan`` and ``estimate`` sit on top; this module imports only the unit helpers.

KV cache, per decoder layer (``ModelSpec.layers``):

* full attention keeps every token, a sliding layer the last ``sliding_window``, a
  chunked layer (Llama 4) the current ``attention_chunk_size`` chunk;
* an attention layer keeps ``kv_heads x (k_dim + v_dim)`` elements per token (K and V
  head sizes may differ);
* MLA layers (DeepSeek-V2/V3, Kimi-K2) keep either the compressed latent
  ``kv_lora_rank + qk_rope_head_dim`` per token, as vLLM, SGLang and transformers 5's
  ``DynamicCache`` store it (``mla_cache="latent"``, the default), or K and V
  decompressed per head (``mla_cache="per_head"``: engines without weight absorption,
  transformers 4);
* linear-attention / SSM layers keep no KV but a fixed state per sequence (conv and
  recurrent state), in the compute dtype (Qwen3-Next's recurrent state in float32, as
  transformers keeps it).

KV dtypes (``kv_format``): ``auto`` (the weights' float dtype, bfloat16 for quantized
weights), ``bfloat16``/``float16``/``float32``, ``fp8``/``fp8_e4m3``/``fp8_e5m2`` (1 byte,
per-tensor scales), ``int8`` (1 byte, static scales), ``int8_per_token_head`` (1 byte plus
one fp32 scale per token and head, memwarden's dynamic INT8 pages), ``int4`` (half a byte
plus an fp16 scale and zero point per group of 64 elements, transformers'
``QuantizedCache`` layout).

Cache pages (``kv_pool``, ``kv_blocks``, ``max_concurrent_sequences``): a budget cut into
blocks as vLLM v1 cuts it, layers of one kind sharing block tables and hybrid models'
kinds (sliding, full, linear-attention state) grouped and padded to equal groups; a
sequence holds whole blocks, a sliding layer its window plus the tokens still in flight,
a state layer one padded page (two with prefix caching). Checked against a real vLLM by
``tests/python/test_vllm_parity.py``.

Activations: the peak of one forward step over ``tokens`` tokens, as eager transformers
allocates it: the residual stream plus the largest of the norm's fp32 upcast, the
attention block (the projections' outputs and rotary copies; the score matrix when the
attention is unfused) and the MLP block (its projections' outputs for the experts a token
runs), or the head (final hidden and logits) when that is larger.

Fixed buffers per accelerator: the CUDA context and a workspace (cuBLAS, attention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from memwarden._checks import integer
from memwarden._devices import SPILL_DEVICES
from memwarden._units import format_bytes

__all__ = [
    "KVFormat", "kv_format", "KV_DTYPES", "kv_bytes_per_token", "kv_layer_bytes", "kv_cache_bytes",
    "state_bytes", "activation_bytes", "fixed_bytes", "KVPool", "kv_pool", "kv_blocks",
    "max_concurrent_sequences",
    "auto_reserve", "CUDA_CONTEXT_BYTES", "WORKSPACE_BYTES", "DEFAULT_PREFILL_CHUNK", "MLA_CACHES",
]

CUDA_CONTEXT_BYTES = 500 * 2**20
WORKSPACE_BYTES = 256 * 2**20
DEFAULT_PREFILL_CHUNK = 2048
MLA_CACHES = ("latent", "per_head")
INT4_KV_GROUP = 64


@dataclass(frozen=True)
class KVFormat:
    """Bytes of a KV element and of the scales stored beside it."""

    name: str
    element_bytes: float
    scale_bytes_per_head: float = 0.0   # per token and head (int8_per_token_head)
    group: int = 0                      # elements per (scale, zero) group (int4)
    group_bytes: int = 0


_KV_FORMATS = {
    "bfloat16": KVFormat("bfloat16", 2), "float16": KVFormat("float16", 2), "float32": KVFormat("float32", 4),
    "fp8_e4m3": KVFormat("fp8_e4m3", 1), "fp8_e5m2": KVFormat("fp8_e5m2", 1), "int8": KVFormat("int8", 1),
    "int8_per_token_head": KVFormat("int8_per_token_head", 1, scale_bytes_per_head=4),
    "int4": KVFormat("int4", 0.5, group=INT4_KV_GROUP, group_bytes=4),
}
_KV_ALIASES = {
    "bf16": "bfloat16", "torch.bfloat16": "bfloat16", "fp16": "float16", "half": "float16",
    "torch.float16": "float16", "fp32": "float32", "float": "float32", "torch.float32": "float32",
    "fp8": "fp8_e4m3", "fp8_e4m3fn": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2",
    "int8_static": "int8",
}
KV_DTYPES = ("auto",) + tuple(_KV_FORMATS)


def kv_format(kv_dtype: Any = "auto", weights_dtype: str = "bfloat16") -> KVFormat:
    """The KV format for ``kv_dtype`` (see the module doc); ``auto`` follows the weights."""
    key = "auto" if kv_dtype is None else str(kv_dtype).lower().strip()
    key = _KV_ALIASES.get(key, key)
    if key == "auto":
        key = weights_dtype if weights_dtype in ("bfloat16", "float16", "float32") else "bfloat16"
    if key not in _KV_FORMATS:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (or bf16, fp16, fp32, fp8), "
                         f"got {kv_dtype!r}")
    return _KV_FORMATS[key]


def _check_mla(mla_cache: str) -> str:
    if mla_cache not in MLA_CACHES:
        raise ValueError(f"mla_cache must be one of {MLA_CACHES}, got {mla_cache!r}")
    return mla_cache


def _layer_token_bytes(layer, fmt: KVFormat, mla_cache: str) -> float:
    """KV bytes one token takes in one layer."""
    if not layer.has_kv:
        return 0.0
    if layer.latent and mla_cache == "latent":
        elements, heads = layer.latent, 1
    else:
        elements, heads = layer.kv_heads * (layer.k_dim + layer.v_dim), 2 * layer.kv_heads
    per = elements * fmt.element_bytes + heads * fmt.scale_bytes_per_head
    if fmt.group:
        per += math.ceil(elements / fmt.group) * fmt.group_bytes
    return per


def kv_bytes_per_token(spec, kv_dtype: Any = "auto", weights_dtype: str = "bfloat16",
                       mla_cache: str = "latent") -> float:
    """KV bytes of one token summed over the layers that keep it (sliding layers included:
    the per-token cost while the context is inside the window)."""
    fmt = kv_format(kv_dtype, weights_dtype)
    _check_mla(mla_cache)
    return sum(_layer_token_bytes(layer, fmt, mla_cache) for layer in spec.layers)


def kv_layer_bytes(spec, context: int, batch: int = 1, kv_dtype: Any = "auto",
                   weights_dtype: str = "bfloat16", mla_cache: str = "latent") -> list:
    """KV bytes of each decoder layer for ``batch`` sequences of ``context`` tokens."""
    integer(context, "context", minimum=0)
    integer(batch, "batch")
    fmt = kv_format(kv_dtype, weights_dtype)
    _check_mla(mla_cache)
    return [int(round(_layer_token_bytes(layer, fmt, mla_cache) * layer.tokens_kept(context) * batch))
            for layer in spec.layers]


def state_bytes(spec, batch: int = 1, state_element_bytes: int = 2) -> list:
    """Recurrent-state bytes of each decoder layer for ``batch`` sequences."""
    integer(batch, "batch")
    return [layer.state_bytes(state_element_bytes) * batch for layer in spec.layers]


def kv_cache_bytes(spec, context: int, batch: int = 1, kv_dtype: Any = "auto", weights_dtype: str = "bfloat16",
                   mla_cache: str = "latent", state_element_bytes: int = 2) -> int:
    """The whole cache: KV of every layer plus the recurrent state of linear/SSM layers."""
    kv = kv_layer_bytes(spec, context, batch, kv_dtype, weights_dtype, mla_cache)
    return sum(kv) + (sum(state_bytes(spec, batch, state_element_bytes)) if context else 0)


def activation_bytes(spec, tokens: int, batch: int = 1, act_bytes: int = 2, context: int | None = None,
                     attention_scores: bool = False, all_logits: bool = False) -> int:
    """Peak activation bytes of one forward step over ``tokens`` tokens in flight
    (``batch`` sequences, attending to ``context`` tokens each), as eager transformers
    allocates them (checked by ``benchmarks/bench_estimate.py``):

        peak = max(layer, head)
        layer = T (4 H e) + max(8 H T, e T (A + 2 Q) [+ e mask], e T MLP) [+ mask] [+ scores]
        MLP   = 1.5 (D - H) + k max(2 X / k - H, 4 H)
        head  = T H e + logits

    T tokens, H hidden size, e bytes per element; 4 H: embeddings, layer input, residual,
    normed input; 8 H: RMSNorm's fp32 upcast; A: outputs of the attention projections,
    2 Q: rotary copies of the queries (Q = heads x head_dim); D: outputs of the dense MLP
    (gate, up, down: 1.5 (D - H) = act(gate), up and their product); X: outputs of the k
    routed experts a token runs (grouped matmuls keep each expert's input copy, both halves
    of gate_up and the weighted output: at least 4 H per expert);
    mask: a layer keeping fewer tokens than the context (sliding window) gets an explicit
    ``[batch, q, k]`` bool mask, converted to the compute dtype inside attention.

    attention_scores: add the ``[batch, heads, q, k]`` score matrix, 10 bytes per element
    (fp32 scores and softmax plus a copy, as measured for eager attention and for SDPA's
    math path, which the CPU takes when V's head size differs from the query's, as in
    MLA) and its 1-byte mask per ``[batch, q, k]``, instead of a fused kernel's tiles.
    all_logits: logits for every position in the compute dtype (a plain forward) instead
    of the last token of each sequence in fp32 (what ``generate`` and servers compute).
    """
    integer(tokens, "tokens")
    integer(batch, "batch")
    hidden, e = spec.hidden_size, act_bytes
    queries = spec.num_heads * spec.head_dim
    attn = e * (max(spec.attn_width, default=0) + 2 * queries)
    top_k = max(1, spec.experts_per_token)

    def mlp_bytes(dense: int, routed: int) -> float:
        per_expert = max(2 * routed / top_k - hidden, 4 * hidden) if routed else 0
        return e * (1.5 * max(0, dense - hidden) + top_k * per_expert)

    mlp = max(map(mlp_bytes, spec.mlp_width, spec.expert_width or [0] * len(spec.mlp_width)), default=0)
    per_seq = max(1, tokens // batch)
    attended = context or per_seq
    # a layer keeping fewer tokens than the context gets an explicit [batch, q, k] bool mask,
    # which attention converts to the compute dtype
    mask = batch * per_seq * attended if any(
        c.has_kv and c.tokens_kept(attended) < attended for c in spec.layers) else 0
    layer = tokens * 4 * hidden * e + max(tokens * 8 * hidden, tokens * attn + e * mask, tokens * mlp) + mask
    if attention_scores:
        kept = max((c.tokens_kept(attended) for c in spec.layers if c.has_kv), default=0)
        layer += batch * (spec.num_heads * 10 + 1) * per_seq * kept
    logits = tokens * spec.vocab_size * e if all_logits else batch * spec.vocab_size * 4
    head = tokens * hidden * e + logits
    return int(max(layer, head))


def fixed_bytes(cuda_context: int = CUDA_CONTEXT_BYTES, workspace: int = WORKSPACE_BYTES) -> int:
    """Fixed buffers of one accelerator."""
    return cuda_context + workspace


@dataclass(frozen=True)
class KVPool:
    """A KV budget cut into blocks as vLLM's paged cache cuts it (see ``kv_pool``)."""

    block_size: int                 # tokens per block
    block_bytes: int                # one block: its tokens in every layer of the widest group
    num_blocks: int
    blocks_per_sequence: int        # blocks one sequence of ``context`` tokens takes, all groups summed
    context: int

    @property
    def max_concurrency(self) -> float:
        """Sequences of ``context`` tokens the blocks hold (vLLM's "Maximum concurrency")."""
        return self.num_blocks / self.blocks_per_sequence

    @property
    def max_sequences(self) -> int:
        return self.num_blocks // self.blocks_per_sequence

    @property
    def tokens(self) -> int:
        """vLLM's "KV cache size" in tokens: the concurrency times the context."""
        return int(self.max_concurrency * self.context)


def _pages(spec, block_size: int, fmt: KVFormat, mla_cache: str, state_element_bytes: int) -> list:
    """(kind, layer, bytes of one page) of every cache a layer keeps: its KV, ``block_size``
    tokens a page, and its recurrent state, one page holding one sequence's state."""
    pages = []
    for layer in spec.layers:
        if layer.has_kv:
            kind = (layer.kind, layer.window if layer.kind != "full" else None)
            pages.append((kind, layer, math.ceil(_layer_token_bytes(layer, fmt, mla_cache) * block_size)))
        if layer.state_bytes(state_element_bytes):
            pages.append((("state", None), layer, layer.state_bytes(state_element_bytes)))
    return pages


def _kv_groups(pages: list) -> list:
    """The pages grouped as vLLM's hybrid KV cache manager groups layers: pages of one kind
    (full, sliding or chunked with one window, state) share block tables; with several
    kinds, each kind is split into groups of ``group_size`` (the fewest pages of a kind, or
    the most when that is under 1.5 times the fewest), the last one short where the count
    does not divide (vLLM's padding layers), so that groups line up."""
    kinds: dict = {}
    for kind, layer, page in pages:
        kinds.setdefault(kind, []).append((kind, layer, page))
    counts = [len(members) for members in kinds.values()]
    if not counts:
        return []
    group_size = max(counts) if max(counts) < 1.5 * min(counts) else min(counts)
    groups = []
    for members in kinds.values():
        num_groups = -(-len(members) // group_size)
        groups += [members[i::num_groups] for i in range(num_groups)]   # vLLM deals them out round-robin
    return groups


def _block_bytes(groups: list) -> int:
    """Bytes of one block: every page of the widest group, where with several kinds each
    page is padded to the largest (vLLM pads a state page to the attention page)."""
    if len(groups) == 1:
        return sum(page for _, _, page in groups[0])
    largest = max(page for group in groups for _, _, page in group)
    return max(len(group) for group in groups) * largest


def _blocks_per_sequence(kind: tuple, layer, context: int, block_size: int, in_flight_tokens: int,
                         prefix_caching: bool) -> int:
    """Blocks one page of ``kind`` takes at most for a sequence of ``context`` tokens, as
    vLLM reserves them: every token for full attention; for a sliding layer the window
    less one plus the tokens still in flight (chunked prefill frees blocks only once
    processed), one block more because the window need not start on a block boundary; for
    a chunked layer the chunk plus the tokens in flight; a state, one block, two with
    prefix caching (vLLM's Mamba "align" mode keeps the state of the last block boundary
    beside the running one)."""
    if kind[0] == "state":
        return 2 if prefix_caching else 1
    if layer.kind == "sliding":
        return -(-min(layer.window - 1 + in_flight_tokens, context) // block_size) + 1
    if layer.kind == "chunked":
        return -(-min(layer.window + in_flight_tokens, context) // block_size)
    return -(-context // block_size)


def kv_pool(spec, budget: int, context: int, block_size: int = 16, kv_dtype: Any = "auto",
            weights_dtype: str = "bfloat16", mla_cache: str = "latent", state_element_bytes: int = 2,
            in_flight_tokens: int = DEFAULT_PREFILL_CHUNK, prefix_caching: bool = True) -> KVPool:
    """``budget`` bytes of cache pages sized as vLLM (v1, ``kv_cache_utils``) sizes them:

        blocks = budget // block_bytes, block_bytes = the pages of the widest group
        blocks per sequence = sum over groups of the blocks one of its pages takes

    with the pages (``_pages``) grouped by ``_kv_groups`` (one group of every layer when
    they are all of one kind), sized by ``_block_bytes`` and taken as
    ``_blocks_per_sequence`` says. ``in_flight_tokens``: tokens scheduled and not yet
    processed, vLLM's ``max_num_batched_tokens`` (times two with async scheduling);
    ``prefix_caching`` (vLLM's default) doubles the blocks of linear-attention / SSM
    states. Not modelled: where a state page is larger than an attention page vLLM raises
    the attention block size until they match (pass the block size it chose), and where
    attention kinds differ in page size it grows the smaller pages' block size instead of
    padding them."""
    integer(budget, "budget", minimum=0)
    integer(context, "context")
    integer(block_size, "block_size")
    integer(in_flight_tokens, "in_flight_tokens")
    fmt = kv_format(kv_dtype, weights_dtype)
    _check_mla(mla_cache)
    groups = _kv_groups(_pages(spec, block_size, fmt, mla_cache, state_element_bytes))
    if not groups:
        raise ValueError(f"{spec.name} keeps no cache (no attention or state layers): blocks have no size")
    blocks = sum(_blocks_per_sequence(kind, layer, context, block_size, in_flight_tokens, prefix_caching)
                 for (kind, layer, _), *_ in groups)
    block_bytes = _block_bytes(groups)
    return KVPool(block_size=block_size, block_bytes=block_bytes, num_blocks=budget // block_bytes,
                  blocks_per_sequence=blocks, context=context)


def kv_blocks(spec, budget: int, block_size: int = 16, kv_dtype: Any = "auto", weights_dtype: str = "bfloat16",
              mla_cache: str = "latent", state_element_bytes: int = 2) -> int:
    """How many blocks of ``block_size`` tokens fit in ``budget`` bytes, as vLLM counts
    them (see ``kv_pool``; for a model of one kind of layer, budget // (block_size x bytes
    per token))."""
    if not any(layer.has_kv for layer in spec.layers):
        raise ValueError(f"{spec.name} keeps no KV cache (no attention layers): blocks have no size")
    context = 1  # blocks do not depend on it
    pool = kv_pool(spec, budget, context, block_size, kv_dtype, weights_dtype, mla_cache, state_element_bytes)
    return pool.num_blocks


def max_concurrent_sequences(spec, budget: int, context: int, block_size: int = 16, kv_dtype: Any = "auto",
                             weights_dtype: str = "bfloat16", mla_cache: str = "latent",
                             state_element_bytes: int = 2, in_flight_tokens: int = DEFAULT_PREFILL_CHUNK,
                             prefix_caching: bool = True) -> int:
    """How many sequences of ``context`` tokens fit in ``budget`` bytes of cache pages, as
    vLLM reserves them (``kv_pool``: sliding layers hold their window and the tokens in
    flight; linear-attention / SSM layers a page of state, two with prefix caching)."""
    return kv_pool(spec, budget, context, block_size, kv_dtype, weights_dtype, mla_cache, state_element_bytes,
                   in_flight_tokens, prefix_caching).max_sequences


def auto_reserve(spec, devices: list, context: int | None, batch: int = 1, weights_dtype: str = "bfloat16",
                 kv_dtype: Any = "auto", prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 mla_cache: str = "latent") -> tuple:
    """Per-accelerator reserve for ``plan(reserve="auto")`` and a sentence saying what it
    assumed: fixed buffers + activations + an even share of the KV cache of ``batch x
    context`` tokens (default: the model's context, at most 4096)."""
    if context is None:
        context = min(spec.max_position_embeddings or 4096, 4096)
    integer(context, "context")
    integer(prefill_chunk, "prefill_chunk")
    accelerators = [d for d in devices if d not in SPILL_DEVICES] or list(devices)
    fmt = kv_format(kv_dtype, weights_dtype)
    kv = kv_cache_bytes(spec, context, batch, fmt.name, weights_dtype, mla_cache)
    act = activation_bytes(spec, batch * min(context, prefill_chunk), batch)
    share = fixed_bytes() + act + -(-kv // len(accelerators))
    note = (f"reserve auto: context {context} x batch {batch}, {fmt.name} KV {format_bytes(kv)} split over "
            f"{len(accelerators)} device(s) + activations {format_bytes(act)} + CUDA context and workspace "
            f"{format_bytes(fixed_bytes())} = {format_bytes(share)} per device")
    return {d: share for d in accelerators}, note
