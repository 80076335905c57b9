"""Where a model description starts: find the config, read it, check every number in it.

Sources, in the order they are tried for a string: an embedded short name, a GGUF file,
a ``config.json`` file or a folder holding one, a Hugging Face hub id (only
``config.json`` is fetched, through ``huggingface_hub``, which honours ``HF_HUB_OFFLINE``
and its local cache). A dict (with ``model_type``) and a ``transformers`` config are taken
as they are. Imports stdlib only; ``huggingface_hub`` is imported when a hub id is asked for.

Validation (``validate_config``): a key that names a count or a size (``num_*``,
``*_size``, ``*_dim``, ``*_heads``, ``*_layers``, ``*_experts``, ``sliding_window``, ...)
must hold a positive integer (or null where a config may leave it out); bools, strings
and floats are not integers. Layer-index lists must stay in ``[0, num_hidden_layers)`` and
``layer_types`` must have one entry per layer. A bad value raises ``ValueError`` naming
the key and the value: a config is checked before anything is built from it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

from memwarden._checks import integer

__all__ = ["CONFIG_DIR", "EMBEDDED", "load_config", "is_gguf", "validate_config", "config_dict"]

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
EMBEDDED = tuple(sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json")))

_GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Keys whose value counts something: a positive integer.
_COUNT_KEY = re.compile(
    r"^(num_|n_)|(_size|_dim|_dims|_heads|_layers|_experts|_rank|_per_tok|_per_token|_count)$"
    r"|^(vocab_size|max_position_embeddings|sliding_window|head_dim|hidden_size|intermediate_size"
    r"|n_embd|n_layer|n_head|n_inner|n_positions|d_model|ffn_dim|attention_chunk_size|moe_topk)$")
# Counts that may be 0 (a feature switched off) or are not counts despite their name.
_ZERO_OK = {
    "first_k_dense_replace", "n_shared_experts", "num_shared_experts", "shared_expert_intermediate_size",
    "num_nextn_predict_layers", "num_kv_shared_layers", "q_lora_rank", "moe_layer_freq",
    "decoder_sparse_step", "num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
    "num_experts_per_tok", "expert_interval", "num_mtp_layers", "mtp_num_hidden_layers",
    "num_dense_layers", "dense_intermediate_size", "num_global_layers", "kv_lora_rank",
    "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "global_head_dim", "num_global_key_value_heads",
    "shared_intermediate_size", "sliding_window",
}
_NOT_COUNTS = {
    "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "max_length", "min_length", "num_beams", "num_beam_groups", "num_return_sequences",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "chunk_size_feed_forward", "top_k",
    "num_labels", "max_window_layers", "sliding_window_pattern", "time_step_rank", "layer_norm_epsilon",
    "window_size", "global_attn_every_n_layers", "image_size", "patch_size", "vision_feature_layer",
    "output_size", "block_size", "group_size", "cross_attention_hidden_size",
    "no_rope_layers", "block_auto_adjust_ff_dim",
}
_LAYER_LISTS = ("mlp_only_layers", "attn_layer_indices", "full_attn_idxs", "swa_layers",
                "no_rope_layers_idx", "dense_layers", "moe_layers")
_SUB_CONFIGS = ("text_config", "decoder", "language_config", "llm_config")


def is_gguf(path: str) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"model: {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model: {path} does not hold a JSON object")
    return cfg


def _from_hub(repo_id: str) -> dict:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError)
    except ImportError:
        raise ValueError(f"model: {repo_id!r} looks like a Hugging Face hub id; reading it needs "
                         "huggingface_hub (pip install 'memwarden[hf]')") from None
    try:
        return _read_json(hf_hub_download(repo_id, "config.json"))
    except (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = "in the local cache (HF_HUB_OFFLINE is set)" if offline else "on the hub or in the local cache"
        raise ValueError(f"model: no config.json for {repo_id!r} {where}: {type(e).__name__}") from None


def load_config(model: Any) -> dict | str:
    """A config dict from a name, path, hub id, dict or transformers config; for a GGUF
    file, its path (the caller reads the header)."""
    if isinstance(model, Mapping):
        return dict(model)
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):
        cfg = model.to_dict()
        cfg.setdefault("model_type", model.model_type)
        return cfg
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):  # a loaded model
        return load_config(model.config)
    if isinstance(model, (str, os.PathLike)):
        key = os.fspath(model)
        if key.lower() in EMBEDDED:
            return _read_json(os.path.join(CONFIG_DIR, key.lower() + ".json"))
        path = key
        if os.path.isdir(path):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if not os.path.isfile(os.path.join(path, "config.json")) and len(ggufs) == 1:
                return os.path.join(path, ggufs[0])
            path = os.path.join(path, "config.json")
        if os.path.isfile(path):
            return path if is_gguf(path) else _read_json(path)
        if _HUB_ID.match(key) and not os.path.exists(key.split("/")[0]):
            return _from_hub(key)
        raise ValueError(
            f"model: unknown model {key!r}; not an embedded name, a file, a folder or a hub id "
            "(org/name). Embedded models: " + ", ".join(EMBEDDED))
    raise ValueError(
        "model must be an embedded name, a config.json or GGUF path, a hub id, a dict or a "
        f"transformers config, got {type(model).__name__}")


def config_dict(cfg: Mapping) -> dict:
    """The config without memwarden's own ``_``-prefixed notes."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _check_count(where: str, key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, (list, tuple)):  # one value per layer (a list of names is no count)
        if any(isinstance(v, str) for v in value):
            return
        for i, v in enumerate(value):
            if not isinstance(v, (list, tuple, Mapping)):
                _check_count(where, f"{key}[{i}]", v)
        return
    integer(value, repr(key), minimum=0 if key.split("[")[0] in _ZERO_OK else 1, where=f"{where}key ")


def validate_config(cfg: Mapping, where: str = "model config ") -> None:
    """Raise ``ValueError`` naming the key and value of the first bad number in ``cfg``."""
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        if key in _SUB_CONFIGS and isinstance(value, Mapping):
            validate_config(value, f"{where}{key}: ")
            continue
        if key in _NOT_COUNTS or key in _LAYER_LISTS or not _COUNT_KEY.search(key):
            continue
        if isinstance(value, Mapping):
            continue
        _check_count(where, key, value)
    layers = cfg.get("num_hidden_layers")
    if isinstance(layers, int) and not isinstance(layers, bool):
        for key in _LAYER_LISTS:
            value = cfg.get(key)
            if isinstance(value, (list, tuple)):
                for i in value:
                    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers:
                        raise ValueError(f"{where}key {key!r} holds {i!r}, not a layer index in "
                                         f"[0, {layers}) (num_hidden_layers={layers})")
        types = cfg.get("layer_types")
        if types is not None:
            if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
                raise ValueError(f"{where}key 'layer_types' must be a list of strings, got {types!r}")
            if len(types) != layers:
                raise ValueError(f"{where}key 'layer_types' has {len(types)} entries, expected one per "
                                 f"layer (num_hidden_layers={layers})")
