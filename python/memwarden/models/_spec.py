"""Architecture facts the memory formulas need, read from a config and the model's parts.

``ModelSpec`` holds, per decoder layer, what its cache holds (``LayerCache``): K/V heads
and head sizes of an attention layer and how many tokens it keeps (all of them, a
sliding window, an attention chunk), the compressed latent of an MLA layer, the
recurrent state of a linear-attention / SSM layer, or nothing. The layer types are read
the way transformers' ``DynamicCache`` reads them (``layer_types``, else all sliding
when ``sliding_window`` is set, all chunked when ``attention_chunk_size`` is, else all
full; the last ``num_kv_shared_layers`` reuse earlier layers' KV). Widths for the
activation model (outputs of the projections a token passes through) come from the
parts, so they are exact for any module layout. Imports nothing heavy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["LayerCache", "ModelSpec", "build_spec", "layer_types", "STATE_TYPES"]

FULL_TYPES = ("full_attention", "attention", "global_attention", "global", "full")
SLIDING_TYPES = ("sliding_attention", "sliding", "local_attention", "local")
CHUNKED_TYPES = ("chunked_attention",)
STATE_TYPES = ("linear_attention", "mamba", "mamba2", "conv", "ssm", "recurrent", "deltanet")
HYBRID_TYPES = {"hybrid": "full", "hybrid_sliding": "sliding"}
NO_CACHE_TYPES = ("moe", "mlp")
INDEXED_TYPES = ("indexed_attention",)  # full attention plus an indexer's keys


@dataclass(frozen=True)
class LayerCache:
    """What one decoder layer keeps per sequence.

    kind: "full", "sliding", "chunked" (attention keeping all tokens, the last ``window``,
    the current chunk), "state" (linear attention / SSM: a fixed-size state, no KV) or
    "none". An attention layer may carry a state too (hybrid layers).
    """

    kind: str
    layer_type: str                 # the config's name for it
    window: int | None = None       # tokens kept by sliding/chunked layers
    kv_heads: int = 0
    k_dim: int = 0                  # per-head key size as transformers stores it
    v_dim: int = 0
    latent: int = 0                 # MLA: kv_lora_rank + qk_rope_head_dim (what vLLM stores)
    state_elements: int | None = 0  # per sequence, in the compute dtype; None: not known
    state_fp32_elements: int = 0    # per sequence, kept in float32 whatever the dtype

    @property
    def has_kv(self) -> bool:
        return self.kind in ("full", "sliding", "chunked")

    def state_bytes(self, element_bytes: int) -> int:
        """Bytes of this layer's recurrent state for one sequence."""
        return (self.state_elements or 0) * element_bytes + self.state_fp32_elements * 4

    def tokens_kept(self, context: int) -> int:
        if self.kind == "full":
            return context
        if self.kind in ("sliding", "chunked"):
            return min(context, self.window)
        return 0


@dataclass(frozen=True)
class ModelSpec:
    """Normalised architecture facts of one model."""

    name: str
    model_type: str
    config: dict = field(repr=False)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple = field(repr=False)         # LayerCache per decoder layer
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    num_experts: int = 0                      # routed experts per MoE layer (0: dense)
    experts_per_token: int = 0
    moe_layers: tuple = ()
    attn_width: tuple = ()                    # per layer: outputs of the attention projections per token
    mlp_width: tuple = ()                     # per layer: outputs of the dense MLP / shared-expert projections
    expert_width: tuple = ()                  # per layer: outputs of the routed experts one token runs
    mla: bool = False

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and len(self.moe_layers) > 0

    @property
    def layer_types(self) -> tuple:
        return tuple(layer.layer_type for layer in self.layers)


class _Config:
    """Attribute-or-key access over a transformers config or a plain dict."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            if isinstance(self.cfg, Mapping):
                value = self.cfg.get(key)
            else:
                try:
                    value = getattr(self.cfg, key, None)
                except Exception:  # a per-layer attribute that has no one global value (Gemma 4)
                    value = None
            if value is not None:
                return value
        return default

    def layer(self, i: int) -> "_Config":
        """The config of layer ``i`` where the model has per-layer configs, else this one."""
        per_layer = self.get("per_layer_config")
        if isinstance(per_layer, (list, tuple)) and i < len(per_layer):
            return _Config(per_layer[i])
        return self


def layer_types(cfg: Any, num_layers: int) -> list:
    """Layer types as transformers' cache reads them (see the module doc)."""
    c = _Config(cfg)
    types = c.get("layer_types")
    if types is None:
        if c.get("sliding_window"):
            types = ["sliding_attention"] * num_layers
        elif c.get("attention_chunk_size"):
            types = ["chunked_attention"] * num_layers
        else:
            types = ["full_attention"] * num_layers
    return list(types)


def _state_elements(c: _Config, hidden: int) -> tuple:
    """Per-sequence state of one linear-attention / SSM layer: (elements in the compute
    dtype or None when unknown, elements kept in float32)."""
    if c.get("linear_num_value_heads"):  # gated delta net (Qwen3-Next): the recurrent state is fp32
        nk, dk = c.get("linear_num_key_heads"), c.get("linear_key_head_dim")
        nv, dv = c.get("linear_num_value_heads"), c.get("linear_value_head_dim")
        kernel = c.get("linear_conv_kernel_dim", default=4)
        return (2 * nk * dk + nv * dv) * kernel, nv * dk * dv
    return _ssm_state_elements(c, hidden), 0


def _ssm_state_elements(c: _Config, hidden: int) -> int | None:
    heads = c.get("mamba_n_heads")
    if heads or c.get("model_type") in ("mamba2",):  # Mamba-2 (Bamba, Granite-4, Nemotron-H, Falcon-H1, Zamba2)
        heads = heads or c.get("num_heads")
        head_dim = c.get("mamba_d_head", "mamba_head_dim", "head_dim")
        state = c.get("mamba_d_state", "state_size", "ssm_state_size")
        groups = c.get("mamba_n_groups", "n_groups", default=1)
        kernel = c.get("mamba_d_conv", "conv_kernel", default=4)
        if not (heads and head_dim and state):
            return None
        inner = heads * head_dim
        return (inner + 2 * groups * state) * kernel + heads * head_dim * state
    state = c.get("mamba_d_state", "state_size")
    if state:  # Mamba-1 (Mamba, Falcon-Mamba, Jamba)
        expand = c.get("mamba_expand")
        inner = expand * hidden if expand else c.get("intermediate_size")
        kernel = c.get("mamba_d_conv", "conv_kernel", default=4)
        return inner * kernel + inner * state if inner else None
    if c.get("conv_L_cache"):  # LFM2 short convolutions
        return hidden * c.get("conv_L_cache")
    return None


def _widths(parts: list, num_layers: int, experts_per_token: int) -> tuple:
    """Per layer, the outputs per token of the attention projections, of the dense MLP
    (and shared experts) and of the ``experts_per_token`` largest routed experts."""
    attn = [0] * num_layers
    dense = [0] * num_layers
    expert_out: dict = {}
    for part in parts:
        if not 0 <= part.layer < num_layers:
            continue
        outs = sum(t.shape[0] for t in part.tensors if t.quantizable and len(t.shape) >= 2)
        if part.kind == "attn":
            attn[part.layer] += outs
        elif part.kind in ("mlp", "moe"):
            dense[part.layer] += outs
        elif part.kind == "expert":
            expert_out.setdefault(part.layer, []).append(outs)
    experts = [sum(sorted(expert_out.get(i, []), reverse=True)[:max(1, experts_per_token)])
               for i in range(num_layers)]
    return tuple(attn), tuple(dense), tuple(experts)


def build_spec(cfg: Any, parts: list, name: str, warnings: list) -> ModelSpec:
    """The spec of a model from its (text) config and its parts."""
    c = _Config(cfg)
    model_type = str(c.get("model_type", default=""))
    hidden = int(c.get("hidden_size"))
    num_layers = int(c.get("num_hidden_layers"))
    heads = int(c.get("num_attention_heads", default=0))  # 0: an attention-free model (Mamba, RWKV)
    kv_list, head_dims = [], []
    for i in range(num_layers):
        lc = c.layer(i)
        kv = lc.get("num_key_value_heads", default=c.get("num_key_value_heads"))
        if kv is None:
            kv = 1 if c.get("multi_query") else lc.get("num_attention_heads", default=heads)
        if isinstance(kv, (list, tuple)):  # per-layer head counts
            kv = kv[i] if i < len(kv) else kv[-1]
        kv_list.append(int(kv))
        lh = lc.get("num_attention_heads", default=heads) or 1
        head_dims.append(int(lc.get("head_dim", default=c.get("head_dim", default=hidden // lh))))
    head_dim = head_dims[0] if head_dims else 0
    v_dim = int(c.get("v_head_dim", default=head_dim))
    kv_rank = c.get("kv_lora_rank") or 0
    mla = kv_rank > 0
    if mla:
        rope = int(c.get("qk_rope_head_dim", default=0))
        head_dim = int(c.get("qk_head_dim", default=int(c.get("qk_nope_head_dim", default=0)) + rope))
        v_dim = int(c.get("v_head_dim", default=head_dim))
        latent = kv_rank + rope
        kv_list = [heads] * num_layers
    else:
        latent = 0
        # a layer's own K projection says how many KV heads it has (MiMo: twice on sliding layers)
        for part in parts:
            if part.kind == "attn" and 0 <= part.layer < num_layers:
                rows = [t.shape[0] for t in part.tensors if t.name.endswith("k_proj.weight") and len(t.shape) == 2]
                dim = head_dims[part.layer]
                if len(rows) == 1 and dim and rows[0] % dim == 0:
                    kv_list[part.layer] = rows[0] // dim
    types = layer_types(cfg, num_layers)
    shared = int(c.get("num_kv_shared_layers", default=0) or 0)
    state, state_fp32 = _state_elements(c, hidden)
    window_sliding = c.get("sliding_window") or None
    window_chunked = c.get("attention_chunk_size") or None
    layers = []
    unknown = set()
    for i, t in enumerate(types):
        kv = kv_list[i] if i < len(kv_list) else kv_list[-1]
        k_dim = head_dims[i] if i < len(head_dims) and not mla else head_dim
        attn = dict(kv_heads=kv, k_dim=k_dim, v_dim=v_dim if (mla or v_dim != head_dim) else k_dim, latent=latent)
        if i >= num_layers - shared:
            layers.append(LayerCache("none", t))
        elif t in FULL_TYPES or t in INDEXED_TYPES:
            layers.append(LayerCache("full", t, **attn))
        elif t in SLIDING_TYPES:
            layers.append(LayerCache("sliding", t, window=window_sliding, **attn))
        elif t in CHUNKED_TYPES:
            layers.append(LayerCache("chunked", t, window=window_chunked, **attn))
        elif t in HYBRID_TYPES:
            kind = HYBRID_TYPES[t]
            window = window_sliding if kind == "sliding" else None
            layers.append(LayerCache(kind, t, window=window, state_elements=state,
                                     state_fp32_elements=state_fp32, **attn))
        elif t in STATE_TYPES:
            layers.append(LayerCache("state", t, state_elements=state, state_fp32_elements=state_fp32))
        elif t in NO_CACHE_TYPES:
            layers.append(LayerCache("none", t))
        else:
            unknown.add(t)
            layers.append(LayerCache("unknown", t))
    if unknown:
        warnings.append(f"layer types {sorted(unknown)} are not priced: their cache is left out of the KV estimate")
    if any(layer.kind in ("sliding", "chunked") and not layer.window for layer in layers):
        raise ValueError(f"model config (model_type={model_type!r}) has sliding or chunked layers but no "
                         "positive 'sliding_window' / 'attention_chunk_size'")
    if any(layer.state_elements is None for layer in layers if layer.kind == "state" or
           layer.layer_type in HYBRID_TYPES):
        warnings.append("the recurrent state of this architecture's linear-attention/SSM layers is not "
                        "known to memwarden: it is left out of the cache estimate")
    experts = [p for p in parts if p.kind == "expert"]
    moe_layers = tuple(sorted({p.layer for p in experts}))
    num_experts = max((p.expert for p in experts), default=-1) + 1
    top_k = int(c.get("num_experts_per_tok", "experts_per_token", "num_experts_per_token", "moe_topk",
                      "num_selected_experts", "moe_k", default=0) or 0)
    if moe_layers and not top_k:
        warnings.append("the config names no experts-per-token count (num_experts_per_tok): activations "
                        "assume 1")
    attn_width, mlp_width, expert_width = _widths(parts, num_layers, top_k)
    return ModelSpec(
        name=name, model_type=model_type, config=dict(cfg) if isinstance(cfg, Mapping) else cfg.to_dict(),
        vocab_size=int(c.get("vocab_size")), hidden_size=hidden, num_layers=num_layers, num_heads=heads,
        num_kv_heads=kv_list[0] if kv_list else 0, head_dim=head_dim, layers=tuple(layers),
        max_position_embeddings=c.get("max_position_embeddings"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", default=False)),
        num_experts=num_experts if moe_layers else 0, experts_per_token=top_k, moe_layers=moe_layers,
        attn_width=attn_width, mlp_width=mlp_width, expert_width=expert_width, mla=mla)
