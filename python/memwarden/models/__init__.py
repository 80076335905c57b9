"""Model descriptions from a Hugging Face config, without downloading weights.

``describe(model, dtype)`` turns a ``config.json`` (an embedded short name such as
``"mixtral-8x7b"``, a path to a JSON file or to a folder holding ``config.json``, a dict
or a ``transformers`` config) into the model's parts with their parameter counts and
sizes in bytes: embeddings, each decoder layer's attention, its dense MLP or its router
plus shared experts and one part per routed expert, the final norm and the head.

Weight formats (``dtype``):

* ``bfloat16``/``float16`` (2 bytes), ``float32`` (4 bytes): every tensor in that dtype.
* ``int8``: the 2-D projection weights inside decoder layers (attention, MLPs, experts)
  take 1 byte per weight plus one fp32 scale per output row (per-channel, as
  ``memwarden.quant``); everything else (embeddings, head, router, norms, biases) stays
  in the compute dtype, bfloat16 unless ``compute_dtype`` says otherwise.
* ``int4``: the same projection weights take half a byte plus one fp16 scale and one
  fp16 zero point per group of 128 input weights (GPTQ/AWQ-style, group size 128).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = [
    "EMBEDDED", "ModelSpec", "Part", "ModelDescription", "list_models", "load_config",
    "model_spec", "describe", "param_count", "weight_format", "dtype_bytes",
]

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
EMBEDDED = tuple(sorted(f[:-5] for f in os.listdir(_CONFIG_DIR) if f.endswith(".json")))

_DTYPES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16", "torch.float16": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32", "torch.float32": "float32",
    "int8": "int8", "w8": "int8", "int4": "int4", "w4": "int4",
}
_FLOAT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
INT4_GROUP = 128


def weight_format(dtype: Any, name: str = "dtype") -> str:
    """Canonical name of a weight format: bfloat16, float16, float32, int8 or int4."""
    key = str(dtype).lower().strip()
    if key not in _DTYPES:
        raise ValueError(
            f"{name} must be one of bfloat16/bf16, float16/fp16, float32/fp32, int8, int4 "
            f"(or a torch float dtype), got {dtype!r}")
    return _DTYPES[key]


def dtype_bytes(dtype: Any, name: str = "dtype") -> int:
    """Bytes of one element of a float dtype (bfloat16, float16, float32; int8 is 1)."""
    fmt = weight_format(dtype, name)
    if fmt == "int8":
        return 1
    if fmt == "int4":
        raise ValueError(f"{name}: int4 has no whole-byte element size")
    return _FLOAT_BYTES[fmt]


# --- config loading -------------------------------------------------------------------

def list_models() -> list[dict]:
    """The embedded models: name, model_type, published parameter count, source."""
    out = []
    for name in EMBEDDED:
        cfg = load_config(name)
        out.append({"name": name, "model_type": cfg["model_type"],
                    "published_params": cfg.get("_published_params"), "source": cfg.get("_source")})
    return out


def load_config(model: Any) -> dict:
    """Return a config dict from an embedded name, a path, a dict or a transformers config."""
    if isinstance(model, ModelSpec):
        return dict(model.config)
    if isinstance(model, Mapping):
        return dict(model)
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):
        cfg = model.to_dict()
        cfg.setdefault("model_type", model.model_type)
        return cfg
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):  # a model instance
        return load_config(model.config)
    if isinstance(model, (str, os.PathLike)):
        key = str(model)
        low = key.lower()
        if low in EMBEDDED:
            with open(os.path.join(_CONFIG_DIR, low + ".json")) as f:
                return json.load(f)
        path = key
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                try:
                    cfg = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"model: {path} is not valid JSON: {e}") from None
            if not isinstance(cfg, dict):
                raise ValueError(f"model: {path} does not hold a JSON object")
            return cfg
        raise ValueError(
            f"model: unknown model {key!r}; not a file or folder either. Embedded models: "
            + ", ".join(EMBEDDED))
    raise ValueError(
        "model must be an embedded name, a config path, a dict or a transformers config, "
        f"got {type(model).__name__}")


def _req(cfg: Mapping, key: str, *alts: str) -> Any:
    for k in (key, *alts):
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    names = " or ".join(repr(k) for k in (key, *alts))
    raise ValueError(f"model config (model_type={cfg.get('model_type')!r}) is missing required key {names}")


def _pos_int(cfg: Mapping, key: str, *alts: str, allow_zero: bool = False) -> int:
    v = _req(cfg, key, *alts)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"model config key {key!r} must be a positive integer, got {v!r}")
    return v


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts memwarden needs, normalised across model families."""

    name: str
    model_type: str
    config: dict
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int          # dense MLP width (0 when no layer is dense)
    tie_word_embeddings: bool
    attention: str                  # "gqa" or "mla"
    attention_bias: bool
    qk_norm: bool                   # per-head q/k RMSNorm (Qwen3)
    sinks: bool                     # per-head attention sinks (gpt-oss)
    num_experts: int                # routed experts per MoE layer (0: dense model)
    experts_per_token: int
    moe_intermediate_size: int
    num_shared_experts: int
    shared_intermediate_size: int
    router_bias: bool
    expert_bias: bool
    moe_layers: tuple               # indices of the MoE layers
    layer_types: tuple              # "full_attention" / "sliding_attention" per layer
    sliding_window: int | None
    max_position_embeddings: int | None
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and len(self.moe_layers) > 0

    def kv_bytes_per_token(self, kv_dtype_bytes: float = 2, context: int | None = None) -> float:
        """KV cache bytes for one sequence of ``context`` tokens divided by ``context``
        (sliding-window layers hold at most ``sliding_window`` tokens). MLA layers cache
        the compressed latent plus the shared rope key: (kv_lora_rank + qk_rope_head_dim)."""
        total = 0.0
        for t in self.layer_types:
            if self.attention == "mla":
                per = self.kv_lora_rank + self.qk_rope_head_dim
            else:
                per = 2 * self.num_kv_heads * self.head_dim
            frac = 1.0
            if t == "sliding_attention" and self.sliding_window and context:
                frac = min(context, self.sliding_window) / context
            total += per * kv_dtype_bytes * frac
        return total


def model_spec(model: Any) -> ModelSpec:
    """Parse a config (see ``load_config``) into a ``ModelSpec``; ValueError names a missing key."""
    if isinstance(model, ModelSpec):
        return model
    name = str(model) if isinstance(model, (str, os.PathLike)) else None
    cfg = load_config(model)
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = dict(cfg["text_config"], model_type=cfg["text_config"].get("model_type", cfg.get("model_type")))
    mt = str(cfg.get("model_type") or "")
    if not mt:
        raise ValueError("model config is missing required key 'model_type'")
    H = _pos_int(cfg, "hidden_size")
    L = _pos_int(cfg, "num_hidden_layers")
    V = _pos_int(cfg, "vocab_size")
    nh = _pos_int(cfg, "num_attention_heads")
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    tie = bool(cfg.get("tie_word_embeddings", False))
    attn_bias = bool(cfg.get("attention_bias", False))
    kw: dict = {}
    attention = "gqa"
    qk_norm = mt in ("qwen3", "qwen3_moe")
    sinks = mt == "gpt_oss"
    n_exp = 0
    topk = 0
    moe_I = 0
    n_shared = 0
    shared_I = 0
    router_bias = expert_bias = False
    moe_layers: tuple = ()
    inter = cfg.get("intermediate_size") or 0

    if mt == "mixtral":
        n_exp = _pos_int(cfg, "num_local_experts")
        topk = _pos_int(cfg, "num_experts_per_tok")
        moe_I = _pos_int(cfg, "intermediate_size")
        moe_layers = tuple(range(L))
        inter = 0
    elif mt == "qwen3_moe" or mt == "qwen2_moe":
        n_exp = _pos_int(cfg, "num_experts")
        topk = _pos_int(cfg, "num_experts_per_tok")
        moe_I = _pos_int(cfg, "moe_intermediate_size")
        step = cfg.get("decoder_sparse_step", 1) or 1
        only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(L) if i not in only and (i + 1) % step == 0)
        if len(moe_layers) < L:
            inter = _pos_int(cfg, "intermediate_size")
        if mt == "qwen2_moe":
            n_shared, shared_I = 1, _pos_int(cfg, "shared_expert_intermediate_size")
            attn_bias = True
            qk_norm = False
    elif mt in ("deepseek_v3", "deepseek_v2"):
        attention = "mla"
        n_exp = _pos_int(cfg, "n_routed_experts")
        topk = _pos_int(cfg, "num_experts_per_tok")
        moe_I = _pos_int(cfg, "moe_intermediate_size")
        n_shared = cfg.get("n_shared_experts") or 0
        shared_I = moe_I * n_shared
        first = cfg.get("first_k_dense_replace", 0) or 0
        freq = cfg.get("moe_layer_freq", 1) or 1
        moe_layers = tuple(i for i in range(L) if i >= first and i % freq == 0)
        inter = _pos_int(cfg, "intermediate_size") if len(moe_layers) < L else 0
        kw = dict(q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=_pos_int(cfg, "kv_lora_rank"),
                  qk_nope_head_dim=_pos_int(cfg, "qk_nope_head_dim"),
                  qk_rope_head_dim=_pos_int(cfg, "qk_rope_head_dim"),
                  v_head_dim=_pos_int(cfg, "v_head_dim"))
        hd = kw["qk_nope_head_dim"] + kw["qk_rope_head_dim"]
    elif mt == "gpt_oss":
        n_exp = _pos_int(cfg, "num_local_experts")
        topk = _pos_int(cfg, "num_experts_per_tok", "experts_per_token")
        moe_I = _pos_int(cfg, "intermediate_size")
        moe_layers = tuple(range(L))
        router_bias = expert_bias = True
        inter = 0
    else:
        # Llama-like dense decoders (llama, mistral, qwen2, qwen3, ...).
        inter = _pos_int(cfg, "intermediate_size")
        if mt == "qwen2":
            attn_bias = True
    layer_types = cfg.get("layer_types")
    window = cfg.get("sliding_window")
    if not layer_types:
        sliding = window is not None and mt in ("mistral", "mixtral") or bool(cfg.get("use_sliding_window"))
        layer_types = ["sliding_attention" if sliding and window else "full_attention"] * L
    if len(layer_types) != L:
        raise ValueError(f"model config key 'layer_types' has {len(layer_types)} entries, expected {L}")
    return ModelSpec(
        name=name or cfg.get("_name_or_path") or mt, model_type=mt, config=cfg, vocab_size=V,
        hidden_size=H, num_layers=L, num_heads=nh, num_kv_heads=int(nkv), head_dim=int(hd),
        intermediate_size=int(inter), tie_word_embeddings=tie, attention=attention,
        attention_bias=attn_bias, qk_norm=qk_norm, sinks=sinks, num_experts=n_exp,
        experts_per_token=topk, moe_intermediate_size=moe_I, num_shared_experts=n_shared,
        shared_intermediate_size=shared_I, router_bias=router_bias, expert_bias=expert_bias,
        moe_layers=moe_layers, layer_types=tuple(layer_types), sliding_window=window,
        max_position_embeddings=cfg.get("max_position_embeddings"), **kw)


# --- parts ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple
    quantizable: bool  # a 2-D projection weight [out, in] inside a decoder layer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, fmt: str, compute_bytes: int) -> int:
        if not self.quantizable or fmt in _FLOAT_BYTES:
            b = _FLOAT_BYTES[fmt] if fmt in _FLOAT_BYTES else compute_bytes
            return self.numel * b
        out, inp = self.shape[-2], self.shape[-1]
        lead = math.prod(self.shape[:-2])
        if fmt == "int8":
            return lead * (out * inp + out * 4)
        # int4: packed nibbles + fp16 scale and zero per group of INT4_GROUP inputs
        return lead * ((out * inp + 1) // 2 + out * math.ceil(inp / INT4_GROUP) * 4)


@dataclass
class Part:
    """One placeable piece of the model."""

    name: str            # "embed", "layers.3.attn", "layers.3.mlp", "layers.3.experts.17", "head"
    kind: str            # embed | attn | mlp | moe | expert | head
    layer: int           # -1 for embed, num_layers for head
    expert: int          # -1 unless kind == "expert"
    modules: tuple       # transformers module paths this part covers
    tensors: tuple = field(repr=False)
    params: int = 0
    bytes: int = 0

    @property
    def is_expert(self) -> bool:
        return self.expert >= 0


@dataclass
class ModelDescription:
    spec: ModelSpec
    dtype: str
    compute_dtype: str
    parts: list

    @property
    def params(self) -> int:
        return sum(p.params for p in self.parts)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    def by_kind(self) -> dict:
        out: dict = {}
        for p in self.parts:
            d = out.setdefault(p.kind, {"parts": 0, "params": 0, "bytes": 0})
            d["parts"] += 1
            d["params"] += p.params
            d["bytes"] += p.bytes
        return out


def _lin(name: str, out: int, inp: int, bias: bool, quant: bool = True) -> list:
    t = [Tensor(name + ".weight", (out, inp), quant)]
    if bias:
        t.append(Tensor(name + ".bias", (out,), False))
    return t


def _attention_tensors(s: ModelSpec, p: str) -> list:
    H = s.hidden_size
    t = [Tensor(p + ".input_layernorm.weight", (H,), False)]
    a = p + ".self_attn"
    if s.attention == "mla":
        qk = s.qk_nope_head_dim + s.qk_rope_head_dim
        if s.q_lora_rank:
            t += _lin(a + ".q_a_proj", s.q_lora_rank, H, s.attention_bias)
            t.append(Tensor(a + ".q_a_layernorm.weight", (s.q_lora_rank,), False))
            t += _lin(a + ".q_b_proj", s.num_heads * qk, s.q_lora_rank, False)
        else:
            t += _lin(a + ".q_proj", s.num_heads * qk, H, False)
        t += _lin(a + ".kv_a_proj_with_mqa", s.kv_lora_rank + s.qk_rope_head_dim, H, s.attention_bias)
        t.append(Tensor(a + ".kv_a_layernorm.weight", (s.kv_lora_rank,), False))
        t += _lin(a + ".kv_b_proj", s.num_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank, False)
        t += _lin(a + ".o_proj", H, s.num_heads * s.v_head_dim, s.attention_bias)
    else:
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        t += _lin(a + ".q_proj", q, H, s.attention_bias)
        t += _lin(a + ".k_proj", kv, H, s.attention_bias)
        t += _lin(a + ".v_proj", kv, H, s.attention_bias)
        t += _lin(a + ".o_proj", H, q, s.attention_bias and s.model_type not in ("qwen2", "qwen2_moe"))
        if s.qk_norm:
            t += [Tensor(a + ".q_norm.weight", (s.head_dim,), False),
                  Tensor(a + ".k_norm.weight", (s.head_dim,), False)]
        if s.sinks:
            t.append(Tensor(a + ".sinks", (s.num_heads,), False))
    return t


def _mlp_tensors(p: str, H: int, inter: int) -> list:
    return (_lin(p + ".gate_proj", inter, H, False) + _lin(p + ".up_proj", inter, H, False)
            + _lin(p + ".down_proj", H, inter, False))


def _router_name(s: ModelSpec) -> str:
    return "router" if s.model_type == "gpt_oss" else "gate"


def _expert_tensors(s: ModelSpec, p: str, e: int) -> list:
    H, I = s.hidden_size, s.moe_intermediate_size
    x = f"{p}.experts"
    if s.model_type == "gpt_oss":  # stored transposed [E, H, 2I] / [E, I, H]; sizes are what count
        t = [Tensor(f"{x}.gate_up_proj[{e}]", (2 * I, H), True), Tensor(f"{x}.down_proj[{e}]", (H, I), True)]
    else:
        t = [Tensor(f"{x}.gate_up_proj[{e}]", (2 * I, H), True), Tensor(f"{x}.down_proj[{e}]", (H, I), True)]
    if s.expert_bias:
        t += [Tensor(f"{x}.gate_up_proj_bias[{e}]", (2 * I,), False), Tensor(f"{x}.down_proj_bias[{e}]", (H,), False)]
    return t


def _parts(s: ModelSpec) -> list:
    H, V, L = s.hidden_size, s.vocab_size, s.num_layers
    parts = [Part("embed", "embed", -1, -1, ("model.embed_tokens", "model.rotary_emb"),
                  (Tensor("model.embed_tokens.weight", (V, H), False),))]
    moe = set(s.moe_layers)
    for i in range(L):
        p = f"model.layers.{i}"
        parts.append(Part(f"layers.{i}.attn", "attn", i, -1, (f"{p}.input_layernorm", f"{p}.self_attn"),
                          tuple(_attention_tensors(s, p))))
        if i in moe:
            m = f"{p}.mlp"
            r = f"{m}.{_router_name(s)}"
            t = [Tensor(f"{p}.post_attention_layernorm.weight", (H,), False),
                 Tensor(r + ".weight", (s.num_experts, H), False)]
            if s.router_bias:
                t.append(Tensor(r + ".bias", (s.num_experts,), False))
            mods = [f"{p}.post_attention_layernorm", r]
            if s.num_shared_experts:
                name = "shared_expert" if s.model_type == "qwen2_moe" else "shared_experts"
                t += _mlp_tensors(f"{m}.{name}", H, s.shared_intermediate_size)
                mods.append(f"{m}.{name}")
                if s.model_type == "qwen2_moe":
                    t.append(Tensor(f"{m}.shared_expert_gate.weight", (1, H), False))
                    mods.append(f"{m}.shared_expert_gate")
            parts.append(Part(f"layers.{i}.moe", "moe", i, -1, tuple(mods), tuple(t)))
            for e in range(s.num_experts):
                parts.append(Part(f"layers.{i}.experts.{e}", "expert", i, e, (f"{m}.experts",),
                                  tuple(_expert_tensors(s, m, e))))
        else:
            t = [Tensor(f"{p}.post_attention_layernorm.weight", (H,), False)] + _mlp_tensors(f"{p}.mlp", H, s.intermediate_size)
            parts.append(Part(f"layers.{i}.mlp", "mlp", i, -1, (f"{p}.post_attention_layernorm", f"{p}.mlp"), tuple(t)))
    head = [Tensor("model.norm.weight", (H,), False)]
    if not s.tie_word_embeddings:
        head.append(Tensor("lm_head.weight", (V, H), False))
    parts.append(Part("head", "head", L, -1, ("model.norm", "lm_head"), tuple(head)))
    return parts


def describe(model: Any, dtype: Any = "bfloat16", compute_dtype: Any = "bfloat16") -> ModelDescription:
    """The model's parts with parameter counts and bytes in weight format ``dtype``."""
    s = model_spec(model)
    fmt = weight_format(dtype, "dtype")
    cfmt = weight_format(compute_dtype, "compute_dtype")
    if cfmt not in _FLOAT_BYTES:
        raise ValueError(f"compute_dtype must be a float dtype, got {compute_dtype!r}")
    cb = _FLOAT_BYTES[cfmt]
    parts = _parts(s)
    for p in parts:
        p.params = sum(t.numel for t in p.tensors)
        p.bytes = sum(t.nbytes(fmt, cb) for t in p.tensors)
    return ModelDescription(spec=s, dtype=fmt, compute_dtype=cfmt, parts=parts)


def param_count(model: Any) -> int:
    """Total parameters of the model (what ``sum(p.numel())`` of the transformers model gives)."""
    return describe(model).params


def parts_table(desc: ModelDescription) -> Iterable[tuple]:
    for p in desc.parts:
        yield p.name, p.kind, p.layer, p.expert, p.params, p.bytes
