"""Small configs for every causal-LM architecture of the pinned transformers.

``small_config(model_type)`` takes the config class's defaults
(``transformers.AutoConfig.for_model``) and shrinks them so that
``AutoModelForCausalLM.from_config`` on the meta device is fast and the
model is tiny, while keeping every layer kind of the architecture: layer
pattern lists (``layer_types``, ``mlp_layer_types``, ``layers_block_type``,
index lists such as ``mlp_only_layers`` ...) are reduced to the first layer
of each distinct combination of per-layer values, and the layer count is set
to match.
"""

from __future__ import annotations

import copy
from typing import Any

import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
MOE_INTERMEDIATE = 64
VOCAB = 512
EXPERTS = 4
TOP_K = 2

# Model types that cannot be built on meta from a config (reason as value).
UNBUILDABLE: dict[str, str] = {
    "gemma3n": "Gemma3nForConditionalGeneration builds its vision tower through TimmWrapperModel, "
               "which needs the optional `timm` package (ImportError); gemma3n_text builds",
    "musicgen": "MODEL_FOR_CAUSAL_LM maps MusicgenConfig to MusicgenForCausalLM, whose __init__ expects a "
                "MusicgenDecoderConfig (AttributeError: no attribute 'dropout'); "
                "MusicgenForCausalLM(config.decoder) builds",
    "musicgen_melody": "same as musicgen: MusicgenMelodyForCausalLM expects MusicgenMelodyDecoderConfig "
                       "(AttributeError: no attribute 'dropout'); building from config.decoder works",
}

# Required constructor arguments of config classes whose defaults do not construct.
_BASE_KWARGS: dict[str, dict[str, Any]] = {
    "musicgen": {"text_encoder": {"model_type": "t5"}, "audio_encoder": {"model_type": "encodec"},
                 "decoder": {}},
    "musicgen_melody": {"text_encoder": {"model_type": "t5"}, "audio_encoder": {"model_type": "encodec"},
                        "decoder": {}},
    # 5.24 builds a default gemma4_text text_config, whose per-layer-input defaults the
    # assistant's own validator rejects
    "gemma4_assistant": {"text_config": {"model_type": "gemma4_text", "hidden_size_per_layer_input": 0,
                                         "vocab_size_per_layer_input": 0, "enable_moe_block": False,
                                         "use_double_wide_mlp": False}},
}


def causal_lm_types() -> list[str]:
    """Sorted model types of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


_HIDDEN_KEYS = {
    "hidden_size", "n_embd", "d_model", "n_embed", "embed_dim", "emb_dim", "dim",
    "embedding_dim", "word_embed_proj_dim", "lru_width", "attention_hidden_size",
    "input_embedding_size", "output_embedding_size", "out_hidden_size",
    "projection_dim", "text_hidden_size", "d_embed", "backbone_hidden_size",
    "hidden_size_per_layer_input",
    # adapter widths validated against hidden_size (dots3_note vision / audio adapters)
    "adapter_in_dim", "adapter_input_size", "adapter_out_dim",
}
_LAYER_KEYS = (
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers",
    "num_decoder_layers", "num_blocks", "depth",
)
_ENC_LAYER_KEYS = {"encoder_layers", "num_encoder_layers"}
_HEAD_KEYS = {
    "num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
    "encoder_attention_heads", "num_decoder_attention_heads",
    "num_encoder_attention_heads", "attention_heads", "swa_num_attention_heads",
}
_KV_KEYS = {"num_key_value_heads", "num_kv_heads", "multi_query_group_num",
            "num_query_groups", "swa_num_key_value_heads", "n_head_kv"}
_HEAD_DIM_KEYS = {"head_dim", "d_head", "attention_head_dim", "kv_channels",
                  "dim_head", "attention_head_size", "swa_head_dim", "d_kv"}
_INTER_KEYS = {
    "intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "n_inner",
    "ffn_hidden_size", "dim_ff", "dff", "feed_forward_size", "dense_intermediate_size",
    "intermediate_size_mlp", "d_ff", "d_inner", "ffn_intermediate_size",
}
_MOE_INTER_KEYS = {
    "moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
    "shared_intermediate_size", "moe_shared_expert_intermediate_size", "ffn_hidden_size_moe",
    "moe_ffn_hidden_size",
}
_EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
_TOPK_KEYS = {"num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token",
              "moe_top_k", "top_k"}
_FIXED = {
    # MLA / sparse-index attention
    "q_lora_rank": 32, "kv_lora_rank": 32, "o_lora_rank": 32, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "qk_head_dim": 16, "index_head_dim": 16,
    "index_n_heads": 2, "index_topk": 16, "o_groups": 2,
    # expert groups
    "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    # state-space / linear attention
    "mamba_d_state": 16, "state_size": 16, "ssm_state_size": 16, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_n_heads": 8, "mamba_num_heads": 8, "mamba_d_ssm": 128,
    "mamba_n_groups": 1, "mamba_ngroups": 1, "n_groups": 1, "time_step_rank": 8,
    "mamba_dt_rank": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_head_dim": 16,
    "linear_num_heads": 4, "rotary_dim": 8, "laurel_rank": 8, "router_hidden_size": 32,
    "adapter_rank": 8,
}
_POS_ONE = {"n_shared_experts", "num_shared_experts", "moe_num_shared_experts"}
# index lists: per-layer membership sets
_INDEX_LIST_KEYS = {"mlp_only_layers", "full_attn_idxs", "hybrid_layer_ids", "moe_layers",
                    "attn_layer_indices", "ple_layer_ids", "no_rope_layer_ids",
                    "global_layers", "local_layers", "sliding_layers", "swa_layers",
                    "kv_shared_layer_ids", "cross_attention_layers"}
# "first k layers" style scalars: layer i is special iff i < value
_PREFIX_KEYS = {"first_k_dense_replace", "num_dense_layers", "n_input_layers"}
# "last k layers" style scalars: layer i is special iff i >= n - value
_SUFFIX_KEYS = {"num_kv_shared_layers", "n_output_layers"}
# layer counts of the section between a prefix and a suffix: n - prefix - suffix
_MIDDLE_KEYS = {"n_recurrent_layers": ("n_input_layers", "n_output_layers")}


def _layer_count(d: dict) -> tuple[str | None, int | None]:
    for k in _LAYER_KEYS:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return k, v
    return None, None


def _pattern_keys(d: dict, n: int) -> list[str]:
    out = []
    for k, v in d.items():
        if k in _INDEX_LIST_KEYS:
            continue
        if isinstance(v, (list, tuple)) and len(v) == n and n > 1 and (
            "layer" in k or "pattern" in k or "block" in k or k in {"attention_layers", "attn_layers"}
            or all(isinstance(x, (int, float, str)) for x in v)
        ):
            out.append(k)
        elif isinstance(v, str) and len(v) == n and n > 1 and ("pattern" in k or "layer" in k):
            out.append(k)
    return out


def _select_layers(d: dict, n: int, extra: dict[str, Any]) -> list[int]:
    """First layer of each distinct combination of per-layer features."""
    pats = _pattern_keys(d, n)
    idx = {k: set(v) for k, v in d.items() if k in _INDEX_LIST_KEYS and isinstance(v, (list, tuple))
           and all(isinstance(x, int) for x in v)}
    prefix = {k: d[k] for k in _PREFIX_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)}
    suffix = {k: d[k] for k in _SUFFIX_KEYS
              if isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] > 0}
    plc = d.get("per_layer_config")
    plc_keys = {int(k) for k in plc} if isinstance(plc, dict) else set()
    seen: dict[tuple, int] = {}
    for i in range(n):
        feat = (
            tuple(d[k][i] for k in pats)
            + tuple(i in s for s in idx.values())
            + tuple(i < v for v in prefix.values())
            + tuple(i >= n - v for v in suffix.values())
            + tuple(f(i) for f in extra.values())
            + ((i in plc_keys),)
        )
        seen.setdefault(feat, i)
    sel = sorted(seen.values())
    need = 2
    i = 0
    while len(sel) < need and i < n:
        if i not in sel:
            sel.append(i)
            sel.sort()
        i += 1
    return sel


def _apply_selection(d: dict, n: int, sel: list[int]) -> dict:
    out: dict[str, Any] = {}
    for k in _pattern_keys(d, n):
        v = d[k]
        new = [v[i] for i in sel]
        out[k] = "".join(new) if isinstance(v, str) else type(v)(new) if isinstance(v, tuple) else new
    remap = {old: new for new, old in enumerate(sel)}
    for k, v in d.items():
        if k in _INDEX_LIST_KEYS and isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v):
            out[k] = [remap[i] for i in v if i in remap]
    for k in _PREFIX_KEYS:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            out[k] = sum(1 for i in sel if i < v)
    for k in _SUFFIX_KEYS:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out[k] = sum(1 for i in sel if i >= n - v)
    for k, (pre, suf) in _MIDDLE_KEYS.items():
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool):
            out[k] = len(sel) - out.get(pre, d.get(pre) or 0) - out.get(suf, d.get(suf) or 0)
    plc = d.get("per_layer_config")
    if isinstance(plc, dict) and plc:
        # heterogeneous per-layer overrides (gemma4): keep them, on the new indices, shrunk;
        # head_dim stays distinct from the base one so heterogeneity is preserved.
        new_plc = {}
        for i, layer_ov in plc.items():
            if int(i) in remap:
                small = _shrink_scalars(layer_ov)
                if "head_dim" in layer_ov:
                    small["head_dim"] = 2 * HEAD_DIM
                new_plc[remap[int(i)]] = {**layer_ov, **small}
        out["per_layer_config"] = new_plc
    return out


def _shrink_scalars(d: dict) -> dict:
    out: dict[str, Any] = {}
    heads = None
    for k in _HEAD_KEYS:
        if isinstance(d.get(k), int):
            heads = d[k]
            break
    for k, v in d.items():
        if v is None:
            # unset sizes the modeling code reads directly (e.g. head_dim=None)
            if k in _HEAD_DIM_KEYS:
                out[k] = HEAD_DIM
            elif k in _KV_KEYS:
                out[k] = KV_HEADS
            elif k in _EXPERT_KEYS:
                out[k] = EXPERTS
            elif k in _POS_ONE:
                out[k] = 1
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        if k in _HIDDEN_KEYS:
            out[k] = HIDDEN
        elif k in _HEAD_KEYS:
            out[k] = HEADS
        elif k in _KV_KEYS:
            out[k] = HEADS if v == heads else (1 if v == 1 else KV_HEADS)
        elif k in _HEAD_DIM_KEYS:
            out[k] = HEAD_DIM
        elif k in _INTER_KEYS:
            out[k] = INTERMEDIATE
        elif k in _MOE_INTER_KEYS:
            out[k] = MOE_INTERMEDIATE
        elif k in _EXPERT_KEYS:
            out[k] = EXPERTS if v > 1 else v
        elif k in _TOPK_KEYS:
            out[k] = min(v, TOP_K)
        elif k in _POS_ONE:
            out[k] = min(v, 1)
        elif k in _FIXED:
            out[k] = _FIXED[k]
        elif k in _ENC_LAYER_KEYS:
            out[k] = 2
        elif k == "vocab_size" or ("vocab" in k and v > VOCAB):
            out[k] = VOCAB if k == "vocab_size" else min(v, VOCAB)
    # optional MLA ranks that are None stay None
    for k in ("q_lora_rank",):
        if k in d and d[k] is None:
            out.pop(k, None)
    return out


def _shrink_rope(rp: Any, head_dim: int) -> Any:
    """Scale ``mrope_section`` (sums to rotary_dim / 2) to the small head_dim."""
    if not isinstance(rp, dict):
        return rp
    if all(isinstance(v, dict) for v in rp.values()) and rp:
        return {k: _shrink_rope(v, head_dim) for k, v in rp.items()}
    sec = rp.get("mrope_section")
    if isinstance(sec, (list, tuple)) and sec and all(isinstance(x, int) for x in sec):
        total = max(len(sec), int(head_dim * rp.get("partial_rotary_factor", 1.0)) // 2)
        old = sum(sec)
        new = [max(1, x * total // old) for x in sec]
        new[0] += total - sum(new)
        rp = {**rp, "mrope_section": new}
    return rp


def _clamp_tokens(d: dict, vocab: int) -> dict:
    out = {}
    for k, v in d.items():
        if not (k.endswith("token_id") or k.endswith("token_ids") or k.endswith("token_index")):
            continue
        if isinstance(v, int) and not isinstance(v, bool) and v >= vocab:
            out[k] = vocab - 1 - (hash(k) % 16)
        elif isinstance(v, list) and v and all(isinstance(x, int) for x in v) and max(v) >= vocab:
            out[k] = [x if x < vocab else vocab - 1 - j for j, x in enumerate(v)]
    return out


def _shrink_dict(d: dict, model_type: str | None = None) -> dict:
    """Overrides for one (sub-)config given as a dict of its values."""
    ov = _shrink_scalars(d)
    lk, n = _layer_count(d)
    if lk is not None:
        sel = _select_layers(d, n, {})
        ov.update(_apply_selection(d, n, sel))
        for k in _LAYER_KEYS:
            if isinstance(d.get(k), int) and not isinstance(d.get(k), bool):
                ov[k] = len(sel)
    for rk in ("rope_parameters", "rope_scaling"):
        if isinstance(d.get(rk), dict):
            new = _shrink_rope(d[rk], ov.get("head_dim", HEAD_DIM))
            if new != d[rk]:
                ov[rk] = new
    vocab = ov.get("vocab_size", d.get("vocab_size"))
    if isinstance(vocab, int):
        ov.update(_clamp_tokens(d, vocab))
    return ov


# ---------------------------------------------------------------- per-type
def _assistant_text(text_type: str) -> dict:
    """Text config of a Gemma 4 (unified) assistant: every layer KV-shared, no PLE/MoE."""
    txt = small_config(text_type).to_diff_dict()
    for k in _NOT_FIELDS:
        txt.pop(k, None)
    txt.update(model_type=text_type, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
               enable_moe_block=False, use_double_wide_mlp=False)
    txt["num_kv_shared_layers"] = txt.get("num_hidden_layers", 2)
    return txt


_GEMMA4_TEXT = {"global_head_dim": 2 * HEAD_DIM}

# Per-type overrides, applied after the generic shrink (value: dict, or callable -> dict).
PER_TYPE: dict[str, Any] = {
    # hidden * expand (128) must equal num_heads * head_dim
    "mamba2": {"num_heads": 8, "head_dim": 16},
    # 2 conv + 2 attention layers, first two dense
    "lfm2": {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
    "lfm2_moe": {"num_hidden_layers": 4, "num_dense_layers": 2,
                 "layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    # default has no attention layer; period 4 / offset 2 keeps "attention layers are dense"
    "jamba": {"num_hidden_layers": 4, "attn_layer_period": 4, "attn_layer_offset": 2,
              "expert_layer_period": 2, "expert_layer_offset": 1},
    # default has attn_layer_indices=None (no attention layer)
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # shared transformer block tied across >= 2 hybrid layers
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    "zamba2": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
               "hybrid_layer_ids": [1, 2]},
    "recurrent_gemma": {"num_hidden_layers": 3},
    # layers per H/L stack (num_hidden_layers is not what sizes the stacks)
    "hrm_text": {"num_layers_per_stack": 2},
    # DbrxAttentionConfig has no rope_theta default, which DbrxAttention reads
    "dbrx": lambda d: {"attn_config": {"attn_pdrop": 0.0, "clip_qkv": None, "kv_n_heads": 2,
                                       "rope_theta": 10000.0}},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [16, 48], "attention_head_size": 16,
                 "num_attention_heads": 4},
    # rope parameters are keyed by layer type
    "cohere_compass_text": {"rope_parameters": {"full_attention": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]}}},
    # indexed_attention layers need the QSA indexer fields, which default to None
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 16, "indexer_compress_ratio": 4},
    "gemma4_text": _GEMMA4_TEXT,
    "gemma4_unified_text": _GEMMA4_TEXT,
    "gemma4_assistant": lambda d: {"text_config": _assistant_text("gemma4_text"), "num_centroids": 16,
                                   "centroid_intermediate_top_k": 4, "backbone_hidden_size": HIDDEN},
    "gemma4_unified_assistant": lambda d: {"text_config": _assistant_text("gemma4_unified_text"),
                                           "num_centroids": 16, "centroid_intermediate_top_k": 4,
                                           "backbone_hidden_size": HIDDEN},
}


_NOT_FIELDS = {"transformers_version", "_name_or_path", "output_attentions", "architectures",
               "per_layer_config"}


def _sub_config_names(cfg) -> list[str]:
    subs = getattr(type(cfg), "sub_configs", None) or {}
    return [k for k in subs if getattr(cfg, k, None) is not None]


def _layout_keys(d: dict) -> list[str]:
    lk, n = _layer_count(d)
    keys = [k for k in _LAYER_KEYS if k in d]
    keys += list(_PREFIX_KEYS | _SUFFIX_KEYS | set(_MIDDLE_KEYS) | _INDEX_LIST_KEYS)
    if lk is not None:
        keys += _pattern_keys(d, n)
    return keys


def _config_values(cfg) -> dict:
    """``cfg.to_dict()``, with the layer layout as the config holds it: a config may serialize
    its layout differently from how it holds it (dory writes each layer as an (attention, mlp)
    pair of ``layer_types`` entries with doubled layer counts, and halves them again on load),
    and a shrunk layout is only consistent in the form the constructor takes as-is."""
    d = cfg.to_dict()
    for k in _layout_keys(d):
        if k in d and hasattr(cfg, k):
            v = getattr(cfg, k)
            same_kind = type(v) is type(d[k]) or (isinstance(v, (list, tuple))
                                                  and isinstance(d[k], (list, tuple)))
            if v != d[k] and same_kind:
                d[k] = copy.deepcopy(v)
    return d


def _shrink_config(cfg, model_type: str | None, top: bool) -> dict:
    d = _config_values(cfg)
    subs = _sub_config_names(cfg)
    for s in subs:
        d.pop(s, None)
    ov = _shrink_dict(d, model_type)
    for s in subs:
        sub = getattr(cfg, s)
        if isinstance(sub, transformers.PretrainedConfig):
            sd = {k: v for k, v in sub.to_dict().items() if k not in _NOT_FIELDS}
            sd["model_type"] = sub.model_type
            sd.update(_shrink_config(sub, None, False))
            ov[s] = sd
    extra = PER_TYPE.get(cfg.model_type, {})
    for k, v in (extra(d) if callable(extra) else extra).items():
        ov[k] = {**ov[k], **v} if isinstance(v, dict) and isinstance(ov.get(k), dict) and k in subs else v
    return ov


def small_config(model_type: str) -> transformers.PretrainedConfig:
    """Default config of ``model_type`` shrunk to a tiny, self-consistent size."""
    base = _BASE_KWARGS.get(model_type, {})
    default = transformers.AutoConfig.for_model(model_type, **base)
    ov = _shrink_config(default, model_type, True)
    return transformers.AutoConfig.for_model(model_type, **{**base, **ov})
