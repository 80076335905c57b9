"""Model descriptions: the parts of a model and their sizes, without loading weights.

``describe(model, dtype)`` accepts an embedded short name (``list_models()``), a
``config.json`` path or a folder holding one, a dict with ``model_type``, a
``transformers`` config, a Hugging Face hub id (only ``config.json`` is read), or a GGUF
file (llama.cpp's format; only its header is read). It returns the model's parts with
their parameter counts and bytes: embeddings, each decoder layer's attention, its dense
MLP or its router plus shared experts and one part per routed expert, the final norm
and the head.

The source of truth for a Hugging Face model is transformers itself: the causal-LM class
the config maps to, built on the meta device (``memwarden.models._meta``), so every
architecture transformers knows is priced from its real modules, and the module names
handed to ``plan.to_device_map()`` exist by construction. A GGUF file is priced from the
exact sizes of its quantized tensors (``memwarden.models._gguf``). An architecture that
neither can describe is an error that names the model type, never a guess.

Weight formats are those of ``memwarden.models._parts`` (bfloat16, float16, float32,
int8, int4, fp8, mxfp4). Every number in a config is checked first
(``memwarden.models._config``). transformers and torch are imported on first use:
``list_models()`` reads the embedded JSON files only.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from memwarden.models._config import EMBEDDED, config_dict, load_config as _load_source, validate_config
from memwarden.models._parts import FLOAT_BYTES, Part, Tensor, weight_format
from memwarden.models._spec import LayerCache, ModelSpec, _Config, build_spec

__all__ = [
    "EMBEDDED", "ModelSpec", "LayerCache", "Part", "Tensor", "ModelDescription", "list_models",
    "load_config", "model_spec", "describe", "param_count", "weight_format", "checkpoint_format",
    "CheckpointFormat",
]

_CORE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class ModelDescription:
    """A model's parts priced in one weight format, and its architecture facts."""

    spec: ModelSpec
    dtype: str                 # weight format (a GGUF file's own type name for GGUF)
    compute_dtype: str
    parts: list
    source: str = ""           # "transformers 5.18.0 (meta device)" or "GGUF header"
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)   # what was assumed (the checkpoint's own format)

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

    def table(self) -> tuple:
        """(title, header, rows, footer): the parts summed by kind, not tensor by tensor."""
        from memwarden._units import format_bytes

        rows = [[kind, d["parts"], f"{d['params'] / 1e9:.3f}B", format_bytes(d["bytes"])]
                for kind, d in sorted(self.by_kind().items(), key=lambda item: -item[1]["bytes"])]
        title = (f"{self.spec.name} ({self.spec.model_type}): {self.params / 1e9:.2f}B parameters, "
                 f"{format_bytes(self.bytes)} in {self.dtype}")
        footer = ([f"source: {self.source}"] if self.source else []) + self.notes + [f"warning: {w}" for w in self.warnings]
        return title, ["kind", "parts", "params", "bytes"], rows, footer

    def __repr__(self) -> str:
        from memwarden._units import format_bytes

        return (f"<ModelDescription {self.spec.name} ({self.spec.model_type}): {self.params / 1e9:.2f}B parameters, "
                f"{format_bytes(self.bytes)} in {self.dtype}, {len(self.parts)} parts>")

    def _repr_html_(self) -> str:
        from memwarden._table import html_table

        return html_table(*self.table())


def load_config(model: Any) -> dict:
    """The config dict of ``model`` (a GGUF file: the config read from its header)."""
    if isinstance(model, ModelDescription):
        return dict(model.spec.config)
    if isinstance(model, ModelSpec):
        return dict(model.config)
    src = _load_source(model)
    if isinstance(src, str):
        from memwarden.models._gguf import read_gguf
        return dict(read_gguf(src).config)
    return src


def list_models() -> list[dict]:
    """The embedded models: name, model_type, layers, experts, context, published parameter
    count and source; read from the JSON files alone (no torch, no transformers)."""
    out = []
    for name in EMBEDDED:
        cfg = _load_source(name)
        experts = next((cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if cfg.get(k)), 0)
        top_k = next((cfg[k] for k in ("num_experts_per_tok", "experts_per_token") if cfg.get(k)), 0)
        out.append({"name": name, "model_type": cfg["model_type"], "layers": cfg.get("num_hidden_layers"),
                    "hidden_size": cfg.get("hidden_size"), "experts": experts, "experts_per_token": top_k,
                    "context": cfg.get("max_position_embeddings"),
                    "published_params": cfg.get("_published_params"), "source": cfg.get("_source")})
    return out


def _transformers_config(cfg: dict, warnings: list):
    """A transformers config object from a config dict (the class's defaults fill the gaps,
    as ``from_pretrained`` would)."""
    try:
        import transformers
        from transformers import CONFIG_MAPPING
    except ImportError:
        raise ValueError("describing a Hugging Face config needs transformers "
                         "(pip install 'memwarden[hf]')") from None
    model_type = cfg.get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise ValueError("model config is missing required key 'model_type'")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model_type {model_type!r} is not an architecture transformers "
                         f"{transformers.__version__} knows; memwarden prices only models transformers can "
                         "build (or a GGUF file), never a guess")
    cls = CONFIG_MAPPING[model_type]
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    missing = [k for k in _CORE_KEYS if k not in text and not any(
        alias in text for alias, target in getattr(cls, "attribute_map", {}).items() if target == k)]
    from memwarden.models._meta import quiet_transformers
    try:
        with quiet_transformers():
            config = cls.from_dict(config_dict(cfg))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"transformers could not read this {model_type!r} config: {e}") from None
    text_config = config.get_text_config(decoder=True)
    for key in missing:
        warnings.append(f"the config gives no {key!r}: transformers' {type(text_config).__name__} default "
                        f"{getattr(text_config, key, None)!r} is used")
    return config


def _name_of(model: Any, cfg: dict) -> str:
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model).rstrip("/")
        if os.path.exists(path):  # a folder or a file: its name, not where it sits
            base = os.path.basename(path)
            return os.path.basename(os.path.dirname(path)) if base == "config.json" else base
        return path
    return str(cfg.get("_name_or_path") or cfg.get("model_type") or "model")


def _describe_gguf(path: str, dtype: Any, compute: str, cb: int) -> ModelDescription:
    from memwarden.models._gguf import gguf_parts, read_gguf

    if dtype is not None:
        raise ValueError("dtype: a GGUF file fixes its weight format; leave dtype out (got {!r})".format(dtype))
    header = read_gguf(path)
    cfg = dict(header.config)
    validate_config(cfg, f"GGUF {os.path.basename(path)}: ")
    cfg = _gguf_layer_types(cfg)
    warnings: list = []
    parts = gguf_parts(header)
    for p in parts:
        p.price("bfloat16", cb)
    spec = build_spec(cfg, parts, header.name or os.path.basename(path), warnings)
    return ModelDescription(spec=spec, dtype=str(header.file_type or "gguf"), compute_dtype=compute,
                            parts=list(parts), source="GGUF header", warnings=warnings)


def _gguf_layer_types(cfg: dict) -> dict:
    """Per-layer attention types the GGUF header leaves implicit (Gemma-2's alternating
    sliding layers), taken from transformers' config class when it knows the model type."""
    if cfg.get("layer_types") or not cfg.get("sliding_window"):
        return cfg
    try:
        from transformers import CONFIG_MAPPING
        cls = CONFIG_MAPPING[cfg["model_type"]]
        keys = {k: v for k, v in cfg.items() if v is not None and k != "model_type"}
        types = getattr(cls(**keys), "layer_types", None)
    except Exception:  # unknown to transformers: the header's facts stand alone
        return cfg
    return dict(cfg, layer_types=list(types)) if types else cfg


_QUANT_METHODS = {"mxfp4": "mxfp4", "fp8": "fp8", "fbgemm_fp8": "fp8", "finegrained_fp8": "fp8"}


class CheckpointFormat(NamedTuple):
    fmt: str          # weight format
    keep: tuple       # module patterns the checkpoint left unquantized
    note: str         # what was read ("" for a plain float checkpoint)
    priced: bool      # False: the checkpoint's quantization is not known to memwarden


def checkpoint_format(config: Any) -> CheckpointFormat:
    """How a checkpoint stores its weights, from its config: ``quantization_config``
    (MXFP4, FP8, GPTQ/AWQ/bitsandbytes bits) when present, else ``dtype``/``torch_dtype``,
    else bfloat16."""
    c = _Config(config)
    qc = c.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    if qc:
        method = str(qc.get("quant_method", "")).lower()
        bits = qc.get("bits") or (4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None)
        fmt = _QUANT_METHODS.get(method) or {4: "int4", 8: "int8"}.get(bits)
        keep = tuple(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or qc.get("ignore") or ())
        if fmt is None:
            return CheckpointFormat("bfloat16", (), f"quantization_config names {method or 'an unknown method'!r}, "
                                    "which memwarden does not price: bfloat16 weights assumed (pass dtype=...)", False)
        return CheckpointFormat(fmt, keep, f"weights priced as the checkpoint stores them: {fmt} "
                                f"({method} quantization_config)", True)
    declared = c.get("dtype", "torch_dtype")
    try:
        fmt = weight_format(str(declared).replace("torch.", "")) if declared else "bfloat16"
    except ValueError:
        fmt = "bfloat16"
    return CheckpointFormat(fmt if fmt in FLOAT_BYTES else "bfloat16", (), "", True)


def describe(model: Any, dtype: Any = None, compute_dtype: Any = "bfloat16") -> ModelDescription:
    """The model's parts with parameter counts and bytes in weight format ``dtype``
    (default: as the checkpoint stores them, see ``checkpoint_format``; a GGUF file keeps
    its own formats). See the module doc."""
    compute = weight_format(compute_dtype, "compute_dtype")
    if compute not in FLOAT_BYTES:
        raise ValueError(f"compute_dtype must be a float dtype, got {compute_dtype!r}")
    cb = FLOAT_BYTES[compute]
    if isinstance(model, ModelDescription):
        if dtype is None or weight_format(dtype) == model.dtype:
            return model
        if model.source == "GGUF header":
            raise ValueError(f"dtype: a GGUF file fixes its weight format ({model.dtype}); it cannot be "
                             f"priced as {dtype!r}")
        model = model.spec.config
    elif isinstance(model, ModelSpec):
        model = model.config
    warnings: list = []
    if hasattr(model, "to_dict") and hasattr(model, "model_type") and hasattr(model, "get_text_config"):
        config, src = model, model.to_dict()   # a transformers config: used as it is
    else:
        src = _load_source(model)
        if isinstance(src, str):
            return _describe_gguf(src, dtype, compute, cb)
        validate_config(src)
        config = _transformers_config(src, warnings)
    keep: tuple = ()
    notes: list = []
    if dtype is None:
        fmt, keep, note, priced = checkpoint_format(config)
        if note:
            (notes if priced else warnings).append(note)
    else:
        fmt = weight_format(dtype, "dtype")
    validate_config(config.to_dict())
    from memwarden.models._meta import meta_parts

    import transformers
    parts = [dataclasses.replace(p) for p in meta_parts(config)]
    for p in parts:
        p.price(fmt, cb, keep)
    text = config.get_text_config(decoder=True)
    spec = build_spec(text, parts, _name_of(model, src), warnings)
    return ModelDescription(spec=spec, dtype=fmt, compute_dtype=compute, parts=parts,
                            source=f"transformers {transformers.__version__} (meta device)", warnings=warnings,
                            notes=notes)


def model_spec(model: Any) -> ModelSpec:
    """Architecture facts of ``model`` (see ``describe``)."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, ModelDescription):
        return model.spec
    return describe(model).spec


def param_count(model: Any) -> int:
    """Total parameters of the model (what ``sum(p.numel())`` of the transformers model gives)."""
    return describe(model).params
